"""The work queue: each LLMDeployment waits at most once and never runs twice at the same time;
failed ones come back after an exponential, jittered backoff."""

from __future__ import annotations

import asyncio
import random

Key = tuple[str, str]  # (namespace, name)
# A failed reconcile is retried after 5 s, then 10, 20 ... up to 5 minutes, each a little jittered so
# that a thousand LLMDeployments refused at once do not all come back in the same second.
RETRY_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0
RETRY_JITTER = 0.2


def retry_delay(failures: int, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after ``failures`` failed reconciles in a row (1 or more)."""
    base = min(RETRY_MAX_SECONDS, RETRY_SECONDS * 2 ** min(failures - 1, 16))
    return min(RETRY_MAX_SECONDS, base * (1 + (rng or random).uniform(-RETRY_JITTER, RETRY_JITTER)))


class WorkQueue:
    """Deduplicating queue: a key waits at most once, and never runs twice at the same time."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._waiting: set[Key] = set()
        self._running: set[Key] = set()
        self._again: set[Key] = set()
        self._due_at: dict[Key, float] = {}  # keys waiting to be added, by when

    def add(self, key: Key) -> None:
        if key in self._running:
            self._again.add(key)
        elif key not in self._waiting:
            self._waiting.add(key)
            self._queue.put_nowait(key)

    async def get(self) -> Key:
        key = await self._queue.get()
        self._waiting.discard(key)
        self._running.add(key)
        return key

    def done(self, key: Key) -> None:
        self._running.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    def add_after(self, key: Key, delay: float) -> None:
        """Add ``key`` in ``delay`` seconds; calls meanwhile are folded into the earliest of them."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if key in self._due_at and self._due_at[key] <= due:
            return
        self._due_at[key] = due
        loop.call_at(due, self._due, key, due)

    def _due(self, key: Key, due: float) -> None:
        if self._due_at.get(key) == due:  # not superseded by an earlier one
            del self._due_at[key]
            self.add(key)

    def __len__(self) -> int:
        return len(self._waiting) + len(self._running)
