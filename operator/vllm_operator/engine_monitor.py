"""The scrape loop: every interval, read every Ready engine's /metrics and /health at once."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

from vllm_operator import observability
from vllm_operator.controller import Controller, Key
from vllm_operator.engine_metrics import EngineSample
from vllm_operator.scraper import MetricsScraper, ScrapeState

log = logging.getLogger("vllm_operator.engines")


class EngineMonitor:
    def __init__(self, controller: Controller, interval: float, timeout: float, concurrency: int) -> None:
        self.controller = controller
        self.interval = interval
        self.scraper = MetricsScraper(timeout=timeout, concurrency=concurrency)
        self.state = ScrapeState()
        self._monitored: set[Key] = set()

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.sweep()
            except Exception:  # one bad sweep must not end monitoring
                log.exception("engine scrape sweep failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def sweep(self) -> None:
        started = time.monotonic()
        targets = self.controller.scrape_targets()
        flat = {(key, pod): url for key, pods in targets.items() for pod, url in pods.items()}
        results = await self.scraper.scrape({_target_id(key, pod): url for (key, pod), url in flat.items()})
        now = datetime.now(timezone.utc)
        for key, pods in targets.items():
            samples: dict[str, EngineSample] = {}
            unhealthy: dict[str, str] = {}
            for pod in pods:
                result = results[_target_id(key, pod)]
                if result.sample is not None:
                    samples[pod] = result.sample
                else:
                    unhealthy[pod] = result.error or "scrape failed"
                    observability.SCRAPE_FAILURES.inc()
            stats = self.state.advance(key, samples, now) if samples else None
            self.controller.update_engine(key, stats, unhealthy)
        for key in self._monitored - set(targets):
            self.controller.update_engine(key, None, {})
        self._monitored = set(targets)
        self.state.retain(self._monitored)
        observability.SCRAPE_SECONDS.observe(time.monotonic() - started)

    async def close(self) -> None:
        await self.scraper.close()


def _target_id(key: Key, pod: str) -> str:
    return f"{key[0]}/{key[1]}/{pod}"
