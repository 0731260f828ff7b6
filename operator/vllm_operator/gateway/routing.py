"""Which replica serves a request, and which LLMDeployment a model name means.

Pure: no I/O, no clocks, no randomness; the caller passes the loads it counted and a turn number.

- ``least_load``: the replica with the least load, where a replica's load is the requests this gateway
  has in flight to it plus its share of what the engines report waiting (status.engine), with the KV
  cache's fill as a fraction of a request. Ties go round, by ``turn``, so that an idle fleet is shared.
- ``PrefixRing``: consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018) on the
  start of what requests share (the messages before the last one): requests that share a system prompt or a
  conversation go to the replica whose KV cache already holds it, unless that replica carries more than ``bound`` times the mean load, then to the next one
  round the ring. Adding or removing a replica moves only the prefixes that hashed next to it.
- ``resolve``: a model name to what serves it, or the names it is close to, for the error.
"""

from __future__ import annotations

import bisect
import difflib
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

# Points per replica on the ring: with 100, each replica's share of the ring is within about ±20 % of even.
VIRTUAL_NODES = 100
# A replica takes a prefix while it carries at most this times the mean in-flight load (KubeAI's and
# the paper's usual 1.25): shared prefixes stay together until one replica would run far ahead of the others.
DEFAULT_BOUND = 1.25
# Characters of the prompt that make the key: enough to tell system prompts apart, short enough to hash fast.
PREFIX_CHARS = 256
# A full KV cache counts as this many requests: it delays new ones as a queue would.
KV_CACHE_WEIGHT = 1.0
# Close names shown with an unknown model: difflib's ratio above which a name looks like a typo.
CLOSE_NAMES = 3
CLOSE_CUTOFF = 0.6

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """What is known of one replica's load."""

    in_flight: int = 0  # requests this gateway sent it that have not finished
    waiting: float = 0.0  # requests queued in the engine, as the operator last published
    kv_cache: float = 0.0  # fill of its KV cache, 0..1

    @property
    def score(self) -> float:
        return self.in_flight + self.waiting + KV_CACHE_WEIGHT * self.kv_cache


def least_load(loads: Mapping[str, ReplicaLoad], turn: int) -> str:
    """The replica with the lowest score; among equals the ``turn``-th (modulo), so ties go round."""
    if not loads:
        raise ValueError("no replica to choose from")
    lowest = min(load.score for load in loads.values())
    tied = sorted(name for name, load in loads.items() if load.score == lowest)
    return tied[turn % len(tied)]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class PrefixRing:
    """The hash ring of one set of replicas; build it again when the set changes."""

    def __init__(self, replicas: Sequence[str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        points = sorted((_hash(f"{name}#{i}"), name) for name in set(replicas) for i in range(virtual_nodes))
        self._hashes = [point for point, _ in points]
        self._names = [name for _, name in points]
        self.replicas = frozenset(replicas)

    def pick(self, key: str, in_flight: Mapping[str, int], bound: float = DEFAULT_BOUND) -> str:
        """The first replica clockwise from ``key`` whose in-flight count, with this request, stays within
        ``bound`` times the mean (this request included) rounded up; there always is one."""
        if not self._names:
            raise ValueError("no replica to choose from")
        total = sum(in_flight.get(name, 0) for name in self.replicas) + 1
        limit = math.ceil(bound * total / len(self.replicas))
        start = bisect.bisect(self._hashes, _hash(key))
        seen: set[str] = set()
        for offset in range(len(self._names)):
            name = self._names[(start + offset) % len(self._names)]
            if name not in seen:
                if in_flight.get(name, 0) + 1 <= limit:
                    return name
                seen.add(name)
        raise AssertionError("the bound leaves room on at least one replica")  # ceil(bound * mean) >= mean


def prompt_prefix(body: Mapping[str, Any], chars: int = PREFIX_CHARS) -> str:
    """The start of the part of a request's prompt that other requests share: the chat messages before the last
    one (the system prompt, the conversation so far), or the only message, or a completion's prompt."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        prompt = body.get("prompt", body.get("input"))
        return (prompt if isinstance(prompt, str) else str(prompt))[:chars]
    parts: list[str] = []
    for message in messages[:-1] or messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts: only their text counts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if isinstance(content, str):
            parts.append(content)
        if sum(map(len, parts)) >= chars:
            break
    return "\n".join(parts)[:chars]


class UnknownModel(LookupError):
    def __init__(self, name: str, close: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.close = close


def resolve(name: str, served: Mapping[str, T]) -> T:
    """What serves the model ``name``; UnknownModel with the closest served names otherwise."""
    if name in served:
        return served[name]
    lowered = {served_name.lower(): served_name for served_name in served}
    close = difflib.get_close_matches(name.lower(), lowered, n=CLOSE_NAMES, cutoff=CLOSE_CUTOFF)
    raise UnknownModel(name, [lowered[c] for c in close])
