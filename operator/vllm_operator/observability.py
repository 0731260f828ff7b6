"""The operator's own Prometheus metrics and structured logging."""

from __future__ import annotations

import json
import logging
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RECONCILES = Counter("vllm_operator_reconcile_total", "Reconciles of LLMDeployments by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "vllm_operator_reconcile_duration_seconds", "Time one reconcile took, by result.", ["result"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_WRITES = Counter("vllm_operator_api_writes_total", "Writes the operator sent to the apiserver.", ["verb", "kind"])
SCRAPE_SECONDS = Histogram(
    "vllm_operator_scrape_sweep_duration_seconds", "Time to scrape every engine once.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
SCRAPE_FAILURES = Counter("vllm_operator_scrape_failures_total", "Engine /metrics or /health requests that failed.")
PHASES = Gauge("vllm_operator_llmdeployments", "LLMDeployments by phase.", ["phase"])
STATUS_WRITES_DEFERRED = Counter(
    "vllm_operator_status_writes_deferred_total",
    "Engine-figure status writes put off: by the per-LLMDeployment interval, or by the fleet's write budget.",
    ["reason"],
)
STATUS_WRITES_WAITING = Gauge(
    "vllm_operator_status_writes_waiting", "LLMDeployments waiting for the write budget to write their figures."
)
ADAPTER_CHANGES = Counter(
    "vllm_operator_adapter_changes_total",
    "LoRA adapters loaded into or unloaded from engines, and loads an engine refused.", ["action"],
)
LEADER = Gauge("vllm_operator_leader", "1 while this replica reconciles and scrapes (leads), 0 while it stands by.")

_phases: dict[tuple[str, str], str] = {}


class _PhaseCollector(Collector):
    """``vllm_operator_llmdeployment_phase``: 1 for each LLMDeployment in its current phase, read from
    ``_phases`` when scraped, so a deleted LLMDeployment (or an ended term) leaves no series behind. The
    ``namespace`` label is the LLMDeployment's: the chart's ServiceMonitor honours it."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("vllm_operator_llmdeployment_phase", "The phase of each LLMDeployment (1).",
                                   labels=["namespace", "llmdeployment", "phase"])
        for (namespace, name), phase in sorted(_phases.items()):
            family.add_metric([namespace, name, phase], 1)
        yield family


REGISTRY.register(_PhaseCollector())


def record_reconcile(result: str, seconds: float) -> None:
    RECONCILES.labels(result).inc()
    RECONCILE_SECONDS.labels(result).observe(seconds)


def record_write(verb: str, kind: str) -> None:
    API_WRITES.labels(verb, kind).inc()


def set_phase(key: tuple[str, str], phase: str | None) -> None:
    if _phases.get(key) == phase:
        return  # called on every reconcile: recounting is only for a change
    if phase is None:
        _phases.pop(key, None)
    else:
        _phases[key] = phase
    _count_phases()


def term_ended() -> None:
    """Zero what only a working leader knows, so that a standby exports no stale phases or backlog."""
    LEADER.set(0)
    _phases.clear()
    _count_phases()
    STATUS_WRITES_WAITING.set(0)


def _count_phases() -> None:
    counts = Tally(_phases.values())
    for name in ("Pending", "Loading", "Ready", "Degraded", "Failed"):
        PHASES.labels(name).set(counts.get(name, 0))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the LLMDeployment's namespace and name when the record has them
    (passed as ``extra``; ``name`` itself is taken by the logger's name)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for attr in ("namespace", "llmdeployment"):
            if hasattr(record, attr):
                entry[attr] = getattr(record, attr)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)
