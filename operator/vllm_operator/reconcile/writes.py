"""When a status is worth a write, and how a fleet shares the apiserver's write capacity.

Anything a person or a controller acts on (phase, conditions, replica counts, which replicas are
scraped, the phase of a model download) is written at once. Engine load figures move with every
scrape, and writing each move cost 11.7 writes per LLMDeployment a minute in ``make bench``: 2,000
writes a second into etcd for 10,000 models. So figures are written only when one of them moved by a meaningful amount from the
value last *written* (a dead band, relative and absolute: noise around a value never writes, a slow
drift eventually does, and going to or from zero always does), at most once per ``min_interval``
per LLMDeployment, and within a global budget of writes per second that serves deferred
LLMDeployments in the order they were deferred. The operator's own ``/metrics`` keeps every
scrape's figures for dashboards and autoscaling. A model download's progress (status.cache) is paced
the same way, without a dead band: while it downloads, it always moved.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Band:
    """A figure counts as moved when it changed by at least ``absolute`` and ``relative`` of its old value."""

    relative: float
    absolute: float

    def moved(self, old: float, new: float) -> bool:
        if (old == 0) != (new == 0):
            return True  # idle <-> busy is news whatever its size
        change = abs(new - old)
        return change >= self.absolute and change >= self.relative * abs(old)


# status.engine field -> its dead band. Latencies move a lot between scrapes on a busy engine.
BANDS: Mapping[str, Band] = {
    "requestsRunning": Band(0.2, 2),
    "requestsWaiting": Band(0.2, 2),
    "kvCacheUsagePercent": Band(0.1, 5),
    "promptTokensPerSecond": Band(0.2, 10),
    "generationTokensPerSecond": Band(0.2, 10),
    "ttftSecondsP50": Band(0.25, 0.05),
    "ttftSecondsP95": Band(0.25, 0.05),
    "itlSecondsP50": Band(0.25, 0.005),
    "itlSecondsP95": Band(0.25, 0.005),
    "prefixCacheHitPercent": Band(0.1, 5),
    "requestErrors": Band(0.5, 1),
}
# Written with the figures, but never a reason to write on their own.
TIMESTAMPS = ("lastScrapeTime", "observedAt")
# status.cache fields that move with every read of a download's progress; its phase, total, revision and
# message are news.
CACHE_FIGURES = ("bytesDone", "percent", "bytesPerSecond", "etaSeconds")


class Change(enum.Enum):
    NONE = "none"  # nothing a reader would notice
    FIGURES = "figures"  # only engine load figures moved: paced
    NOW = "now"  # something a person or a controller acts on


def figures_moved(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> bool:
    old, new = old or {}, new or {}
    for name, band in BANDS.items():
        if (name in old) != (name in new):
            return True
        if name in new and band.moved(float(old[name]), float(new[name])):
            return True
    return False


def _cache_news(cache: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if cache is None else {k: v for k, v in cache.items() if k not in CACHE_FIGURES}


def classify(old: Mapping[str, Any], new: Mapping[str, Any]) -> Change:
    """What writing ``new`` over ``old`` (the status last written) would tell a reader."""
    old_engine, new_engine = old.get("engine"), new.get("engine")
    old_cache, new_cache = old.get("cache"), new.get("cache")
    rest_old = {k: v for k, v in old.items() if k not in ("engine", "cache")}
    rest_new = {k: v for k, v in new.items() if k not in ("engine", "cache")}
    if (rest_old != rest_new or (old_engine is None) != (new_engine is None)
            or _cache_news(old_cache) != _cache_news(new_cache)):
        return Change.NOW
    if old_engine is not None and new_engine is not None \
            and old_engine.get("scrapedReplicas") != new_engine.get("scrapedReplicas"):
        return Change.NOW
    engine_moved = old_engine is not None and new_engine is not None and figures_moved(old_engine, new_engine)
    # A download's progress always moves: its figures are paced, never dropped.
    return Change.FIGURES if engine_moved or old_cache != new_cache else Change.NONE


class WriteBudget:
    """A global token bucket for figure-only status writes, fair across LLMDeployments.

    A key that finds no token takes a numbered place in line; tokens then go to the line's head
    first, so a busy LLMDeployment that asks on every scrape cannot starve one that asked once. A key
    that does not come back within ``GRACE_SECONDS`` of its turn (its reconcile failed and backs off
    for minutes, say) loses its place rather than holding every key behind it; it queues again when
    it asks again.
    """

    GRACE_SECONDS = 30.0

    def __init__(self, per_second: float, burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.rate = per_second
        self.burst = float(burst if burst is not None else max(1, int(per_second)))
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()
        self._line: OrderedDict[Hashable, int] = OrderedDict()  # key -> its place, in order
        self._turn: dict[Hashable, float] = {}  # key -> when it was told to come back
        self._places = 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def request(self, key: Hashable) -> float:
        """0 when ``key`` may write now (a token is taken); otherwise the seconds until its turn."""
        self._refill()
        now = self._at
        while self._line:
            head = next(iter(self._line))
            if head == key or self._turn[head] + self.GRACE_SECONDS >= now:
                break
            self.cancel(head)  # its turn is long past: it no longer asks
        head = next(iter(self._line), key)
        if head == key and self._tokens >= 1:
            self._tokens -= 1
            self.cancel(key)
            return 0.0
        if key not in self._line:
            self._line[key] = self._places
            self._places += 1
        # Places of keys that left the line meanwhile still count: an upper bound, and O(1).
        ahead = self._line[key] - next(iter(self._line.values()))
        wait = max((ahead + 1 - self._tokens) / self.rate, 1 / self.rate)
        self._turn[key] = now + wait
        return wait

    def cancel(self, key: Hashable) -> None:
        """``key`` no longer needs its write (deleted, or its figures went back): leave the line."""
        self._line.pop(key, None)
        self._turn.pop(key, None)

    @property
    def waiting(self) -> int:
        return len(self._line)
