"""The scrape loop: every interval, read every Ready engine's /metrics and /health at once, and tell the
controller each LLMDeployment's load and which of its engines are unhealthy."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Protocol

from vllm_operator import observability
from vllm_operator.reconcile.controller import Key
from vllm_operator.engines.metrics import EngineSample, EngineStats
from vllm_operator.engines.scrape import MetricsScraper, ScrapeState, judge_health

log = logging.getLogger("vllm_operator.engines")


class Engines(Protocol):
    """What the monitor needs of the controller."""

    def scrape_targets(self) -> dict[Key, dict[str, str]]: ...

    def update_engine(self, key: Key, stats: EngineStats | None, unhealthy: dict[str, str]) -> None: ...


class EngineMonitor:
    def __init__(self, controller: Engines, interval: float, timeout: float, concurrency: int) -> None:
        self.controller = controller
        self.interval = interval
        self.scraper = MetricsScraper(timeout=timeout, concurrency=concurrency)
        self.state = ScrapeState()
        self._monitored: set[Key] = set()
        # Failed scrapes in a row, by target; only the failing ones.
        self._failures: dict[str, int] = {}

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
        self._failures, unhealthy_targets = judge_health(self._failures, results)
        now = datetime.now(timezone.utc)
        for key, pods in targets.items():
            samples: dict[str, EngineSample] = {}
            unhealthy: dict[str, str] = {}
            for pod in pods:
                target = _target_id(key, pod)
                result = results[target]
                if result.sample is not None:
                    samples[pod] = result.sample
                else:
                    observability.SCRAPE_FAILURES.inc()
                if target in unhealthy_targets:
                    unhealthy[pod] = unhealthy_targets[target]
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
