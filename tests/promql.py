"""Metric names in PromQL, and the names that exist: what real vLLM 0.32 engines export (the captured
``/metrics`` bodies), what the operator registers, and the series Prometheus adds to every scrape."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from vllm_operator import observability  # noqa: F401 - registers the operator's metrics in REGISTRY
from vllm_operator.engines import export

ENGINE_BODIES = sorted((Path(__file__).resolve().parent / "data" / "vllm-0.32.0").glob("metrics-*.txt"))
# Written by Prometheus itself for every target.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped",
                           "scrape_samples_post_metric_relabeling", "scrape_series_added"})
# Sample names of a family, by its type (prometheus_client's exposition).
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"), "info": ("_info",), "stateset": ("",), "unknown": ("",)}
KEYWORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                      "offset", "bool", "inf", "nan"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"]+)"')
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+(?::\w+)?\}?")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"label_values\((.*),\s*\w+\s*\)", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """Every metric an expression (or a Grafana ``label_values(selector, label)`` query) reads."""
    variable = _LABEL_VALUES.fullmatch(expr.strip())
    if variable:
        expr = variable.group(1)
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', _GRAFANA_VARIABLE.sub("1m", expr))
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", text)))
    for name, call in _IDENTIFIER.findall(text):
        if not call and name.lower() not in KEYWORDS:
            names.add(name)
    return names


def engine_names(bodies: Iterable[Path] = ENGINE_BODIES) -> set[str]:
    return {sample.name for body in bodies for family in text_string_to_metric_families(body.read_text())
            for sample in family.samples}


def operator_names() -> set[str]:
    """Sample names of every family in the operator's registry, children or not, and of the engine load it
    exports per LLMDeployment (registered once a controller runs)."""
    registered = {family.name + suffix for family in REGISTRY.collect() for suffix in SUFFIXES[family.type]}
    return registered | {family.name for family in export.EngineLoadCollector(dict).collect()}


def known_names() -> set[str]:
    return engine_names() | operator_names() | SCRAPE_SERIES


def unknown_names(exprs: Iterable[str], known: set[str]) -> dict[str, set[str]]:
    """Per expression, the metric names it reads that nothing exports."""
    return {expr: missing for expr in exprs if (missing := metric_names(expr) - known)}
