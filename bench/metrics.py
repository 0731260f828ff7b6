"""Samples read from Prometheus text: the apiserver's request counts and the operator's own metrics."""

from __future__ import annotations

from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

Requests = Counter[tuple[str, str, str]]  # (verb, resource, subresource) -> requests served


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` as written on its lines (``x_total``, ``x_bucket``...), labels and value."""
    # The apiserver's exposition is megabytes long; parse only the lines asked for.
    lines = [line for line in text.splitlines() if line.startswith((name + "{", name + " "))]
    parsed = text_string_to_metric_families("\n".join(lines) + "\n")
    return [(sample.labels, sample.value) for family in parsed for sample in family.samples]


def total(text: str, name: str) -> float:
    return sum(value for _labels, value in samples(text, name))


def apiserver_requests(text: str) -> Requests:
    counts: Requests = Counter()
    for labels, value in samples(text, "apiserver_request_total"):
        counts[labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", "")] += value
    return counts


def buckets(text: str, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound."""
    return {float(labels["le"]): value for labels, value in samples(text, name + "_bucket")}


def over(cumulative: dict[float, float], count: float, bound: float) -> float:
    """How many of a histogram's ``count`` observations lie above ``bound``, one of its bucket bounds."""
    if bound not in cumulative:
        raise ValueError(f"the histogram has no bucket le={bound:g}")
    return count - cumulative[bound]
