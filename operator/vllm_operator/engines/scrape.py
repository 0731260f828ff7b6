"""Read /metrics and /health of many vLLM engines at once over one pooled HTTP session, and decide
from successive scrapes which engines are unhealthy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import TypeVar

import aiohttp

from vllm_operator.render.engine_args import ENGINE_KEEP_ALIVE_SECONDS
from vllm_operator.engines.metrics import EngineSample, EngineStats, aggregate, parse_sample

# A connection outlives the pause between sweeps, so the next sweep skips the connect: that is about
# a third of a sweep's CPU. The operator starts engines with a longer keep-alive (engine_args), and
# ours ends first so a request never races the engine closing the connection; a request that does
# (an engine with a shorter keep-alive) is retried once by aiohttp on a new connection.
KEEPALIVE_SECONDS = ENGINE_KEEP_ALIVE_SECONDS - 15
MAX_BODY_IN_ERROR = 200
# What a failing status most likely means, for the person reading the error.
STATUS_HINTS = {
    ("/health", 503): "engine core is dead",
    ("/metrics", 404): "no /metrics here: is this a vLLM OpenAI server?",
}
# vLLM's answer once its engine core has died; the engine does not recover from that by itself.
ENGINE_DEAD = ("/health", 503)
# One failed scrape is often noise (a dropped packet, a pause of the engine's event loop); two in a
# row are worth reporting.
FAILURES_IN_A_ROW = 2


class Failure(Enum):
    """Why a scrape has no sample, as far as it decides how soon and how the failure is reported."""

    DEAD = "dead"  # the engine says its core is dead
    ENGINE = "engine"  # the engine answered, but not with usable metrics
    NETWORK = "network"  # no answer: refused, reset or timed out

    @property
    def label(self) -> str:
        """Whose fault it is, for the person reading the status."""
        return "unreachable" if self is Failure.NETWORK else "engine unhealthy"


@dataclass(frozen=True)
class ScrapeResult:
    """Either the engine's sample, or why there is none: worded for a person, and as a kind."""

    sample: EngineSample | None = None
    error: str | None = None
    failure: Failure | None = None


@dataclass(frozen=True)
class _Reply:
    body: str = ""
    error: str | None = None
    failure: Failure | None = None
    at: float = 0.0


class MetricsScraper:
    """Scrapes engines concurrently; at most ``concurrency`` requests are in flight at any time."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        concurrency: int = 64,
        api_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0 or concurrency < 1:
            raise ValueError("timeout must be positive and concurrency at least 1")
        self.timeout = timeout
        self.concurrency = concurrency
        self._clock = clock
        # /metrics and /health are open in vLLM; a key only matters behind an authenticating proxy.
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._semaphore = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running event loop that will own it.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.concurrency, keepalive_timeout=KEEPALIVE_SECONDS)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout), headers=self._headers
            )
        return self._session

    async def scrape(self, targets: Mapping[str, str]) -> dict[str, ScrapeResult]:
        """Scrape every target (name -> base URL such as ``http://10.0.0.5:8000``); one result per name."""
        session = self._client()
        names = list(targets)
        results = await asyncio.gather(*(self._scrape_one(session, targets[name]) for name in names))
        return dict(zip(names, results))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _scrape_one(self, session: aiohttp.ClientSession, base_url: str) -> ScrapeResult:
        # One after the other, so /metrics reuses the connection /health opened; a dead engine
        # core is the more useful thing to report, and then /metrics is not worth asking.
        health = await self._get(session, base_url, "/health")
        if health.failure is not None:
            return ScrapeResult(error=health.error, failure=health.failure)
        metrics = await self._get(session, base_url, "/metrics")
        if metrics.failure is not None:
            return ScrapeResult(error=metrics.error, failure=metrics.failure)
        try:
            return ScrapeResult(sample=parse_sample(metrics.body, metrics.at))
        except ValueError as exc:
            return ScrapeResult(error=f"GET /metrics answered text that is not usable: {exc}", failure=Failure.ENGINE)

    async def _get(self, session: aiohttp.ClientSession, base_url: str, path: str) -> _Reply:
        url = base_url.rstrip("/") + path
        # The semaphore is taken before the timeout starts: waiting for a slot is not the engine's fault.
        async with self._semaphore:
            try:
                async with session.get(url) as response:
                    body = await response.text()
                    if response.status != 200:
                        dead = (path, response.status) == ENGINE_DEAD
                        return _Reply(
                            error=_status_error(path, response.status, body),
                            failure=Failure.DEAD if dead else Failure.ENGINE,
                        )
                    return _Reply(body=body, at=self._clock())
            except TimeoutError:
                return _Reply(error=f"GET {path}: timeout after {self.timeout:g}s", failure=Failure.NETWORK)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, ConnectionRefusedError):
                    error = f"GET {path}: connection refused by {exc.host}:{exc.port}"
                else:
                    error = f"GET {path}: cannot connect to {exc.host}:{exc.port}: {exc.os_error}"
                return _Reply(error=error, failure=Failure.NETWORK)
            except aiohttp.ClientError as exc:
                return _Reply(error=f"GET {path}: {type(exc).__name__}: {exc}", failure=Failure.NETWORK)
            except UnicodeDecodeError as exc:
                return _Reply(error=f"GET {path}: body is not text: {exc}", failure=Failure.ENGINE)


def _status_error(path: str, status: int, body: str) -> str:
    detail = STATUS_HINTS.get((path, status)) or " ".join(body.split())[:MAX_BODY_IN_ERROR]
    return f"GET {path} answered {status}" + (f": {detail}" if detail else "")


Replica = TypeVar("Replica", bound=Hashable)


def judge_health(
    streaks: Mapping[Replica, int], results: Mapping[Replica, ScrapeResult]
) -> tuple[dict[Replica, int], dict[Replica, str]]:
    """The failure streaks after this sweep, and the replicas that are unhealthy with why.

    ``streaks`` counts each replica's failed scrapes in a row up to the last sweep. A replica is
    unhealthy once it has failed FAILURES_IN_A_ROW scrapes in a row, or at once when its engine says
    it is dead. Replicas not in ``results`` are gone, and so are their streaks.
    """
    new_streaks: dict[Replica, int] = {}
    unhealthy: dict[Replica, str] = {}
    for replica, result in results.items():
        if result.failure is None:
            continue
        new_streaks[replica] = streaks.get(replica, 0) + 1
        if result.failure is Failure.DEAD:
            unhealthy[replica] = f"{result.failure.label}: {result.error}"
        elif new_streaks[replica] >= FAILURES_IN_A_ROW:
            # The threshold, not the count: a message that changed every sweep would rewrite the status every sweep.
            unhealthy[replica] = f"{result.failure.label}: {result.error} ({FAILURES_IN_A_ROW} scrapes in a row)"
    return new_streaks, unhealthy


class ScrapeState:
    """The last sample of every engine, per LLMDeployment, so each scrape can be turned into rates."""

    def __init__(self) -> None:
        self._previous: dict[Hashable, dict[str, EngineSample]] = {}

    def advance(self, key: Hashable, current: Mapping[str, EngineSample], now_wall: datetime) -> EngineStats:
        """Stats over the interval since the last call for ``key``; Pods not in ``current`` are forgotten."""
        stats = aggregate(self._previous.get(key, {}), current, now_wall)
        self._previous[key] = dict(current)
        return stats

    def retain(self, keys: Collection[Hashable]) -> None:
        """Forget LLMDeployments that are gone."""
        for key in self._previous.keys() - set(keys):
            del self._previous[key]
