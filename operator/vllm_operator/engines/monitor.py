"""The scrape loop: every interval, read every Ready engine's /metrics and /health at once, and tell the
controller each LLMDeployment's load and which of its engines are unhealthy."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from collections.abc import Awaitable, Callable
from typing import Protocol

from vllm_operator import observability
from vllm_operator.reconcile.controller import Key
from vllm_operator.engines.metrics import EngineSample, EngineStats
from vllm_operator.engines.scrape import MetricsScraper, ScrapeState, judge_health
from vllm_operator.engines.startup import StartupStage, stage
from vllm_operator.kube import KubeError

log = logging.getLogger("vllm_operator.engines")


class Engines(Protocol):
    """What the monitor needs of the controller."""

    def scrape_targets(self) -> dict[Key, dict[str, str]]: ...

    def update_engine(self, key: Key, stats: EngineStats | None, unhealthy: dict[str, str]) -> None: ...

    def starting_pods(self) -> dict[Key, list[str]]: ...

    def update_startup(self, key: Key, stages: dict[str, StartupStage]) -> None: ...


# Reads a starting engine's log: (namespace, pod) -> its last lines.
LogReader = Callable[[str, str], Awaitable[str]]
# Log reads per sweep at most, the least recently read first: a fleet rolling out a thousand replicas must not
# spend the operator's apiserver budget on logs. A replica's stage is then at most a few sweeps old.
LOG_READS_PER_SWEEP = 20


class EngineMonitor:
    def __init__(self, controller: Engines, interval: float, timeout: float, concurrency: int,
                 logs: LogReader | None = None) -> None:
        self.controller = controller
        self.logs = logs
        # When each starting replica's log was last read, and the stage it named.
        self._read: dict[tuple[Key, str], tuple[float, StartupStage]] = {}
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
        if self.logs is not None:
            await self._read_startups()
        observability.SCRAPE_SECONDS.observe(time.monotonic() - started)

    async def _read_startups(self) -> None:
        """The stage of every starting replica, from the logs read least recently."""
        starting = self.controller.starting_pods()
        for key in {key for key, _ in self._read} - set(starting):
            self.controller.update_startup(key, {})  # all its replicas started, or went
        replicas = [(key, pod) for key, pods in starting.items() for pod in pods]
        current = set(replicas)
        self._read = {replica: read for replica, read in self._read.items() if replica in current}
        due = sorted(replicas, key=lambda replica: self._read.get(replica, (float("-inf"), ""))[0])
        due = due[:LOG_READS_PER_SWEEP]
        texts = await asyncio.gather(*(self._log(key, pod) for key, pod in due))
        now = time.monotonic()
        for replica, text in zip(due, texts):
            if text is not None:
                self._read[replica] = (now, stage(text))
        for key, pods in starting.items():
            self.controller.update_startup(key, {pod: self._read[(key, pod)][1] for pod in pods
                                                 if (key, pod) in self._read})

    async def _log(self, key: Key, pod: str) -> str | None:
        assert self.logs is not None
        try:
            return await self.logs(key[0], pod)
        except KubeError as exc:  # no log yet, or no permission: the stage stays as last read
            log.debug("reading the log of %s/%s: %s", key[0], pod, exc)
            return None

    async def close(self) -> None:
        await self.scraper.close()


def _target_id(key: Key, pod: str) -> str:
    return f"{key[0]}/{key[1]}/{pod}"
