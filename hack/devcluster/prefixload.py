"""The shared-prefix workload that compares the gateway's routing strategies on real engines (the e2e test and
`make bench` both send it): teams, each with its own long system prompt, asking questions in turns, so that a
router which keeps a team on one replica finds the team's prompt in that replica's prefix cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from vllm_operator.engines.metrics import parse_sample

TEAMS = 7
QUESTIONS = 4
REQUESTS = TEAMS * QUESTIONS


def chats(label: str) -> Iterator[list[dict[str, str]]]:
    """The messages of each request in order; ``label`` makes the prompts of each run new to the engines."""
    for question in range(QUESTIONS):
        for team in range(TEAMS):
            system = f"{label} team {team}: " + " ".join(f"rule {team}-{i} applies." for i in range(12))
            yield [{"role": "system", "content": system}, {"role": "user", "content": f"Question {question}?"}]


def prefix_counters(metrics_bodies: Iterable[str]) -> tuple[float, float]:
    """(hits, queries) of the prefix cache, in tokens, summed over the engines' /metrics bodies."""
    hits = queries = 0.0
    for body in metrics_bodies:
        sample = parse_sample(body, 0.0)
        hits += sample.prefix_cache_hits.value
        queries += sample.prefix_cache_queries.value
    return hits, queries


def hit_percent(before: tuple[float, float], after: tuple[float, float]) -> float:
    return 100 * (after[0] - before[0]) / (after[1] - before[1])


def request_body(model: str, messages: list[dict[str, str]]) -> Mapping[str, Any]:
    return {"model": model, "messages": messages, "max_tokens": 1}
