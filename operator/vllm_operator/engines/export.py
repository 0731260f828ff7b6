"""Every LLMDeployment's engine load on the operator's own ``/metrics``, as of the latest scrape.

The status holds figures that moved by a meaningful amount (reconcile/writes.py); dashboards, alerts
and a KEDA or Prometheus-adapter autoscaler read these instead, under stable names with
``namespace`` and ``llmdeployment`` labels. Read from the controller when Prometheus scrapes, so a
deleted LLMDeployment, or a replica that stopped leading, leaves no series behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vllm_operator.engines.metrics import EngineStats

Key = tuple[str, str]

# (metric name, help, EngineStats field)
SERIES = (
    ("vllm_operator_engine_requests_running", "Requests being processed by the LLMDeployment's engines.",
     "requests_running"),
    ("vllm_operator_engine_requests_waiting", "Requests queued in the LLMDeployment's engines.", "requests_waiting"),
    ("vllm_operator_engine_kv_cache_usage_percent", "KV-cache use of the LLMDeployment's fullest engine, percent.",
     "kv_cache_usage_percent"),
    ("vllm_operator_engine_generation_tokens_per_second", "Tokens generated per second by the LLMDeployment's engines.",
     "generation_tokens_per_second"),
    ("vllm_operator_engine_prompt_tokens_per_second", "Prompt tokens processed per second by the LLMDeployment's "
     "engines.", "prompt_tokens_per_second"),
    ("vllm_operator_engine_scraped_replicas", "Engines of the LLMDeployment whose /metrics answered the last scrape.",
     "scraped_replicas"),
)


class EngineLoadCollector(Collector):
    def __init__(self, loads: Callable[[], Mapping[Key, EngineStats | None]],
                 desired: Callable[[], Mapping[Key, int]] = dict) -> None:
        self._loads = loads
        self._desired = desired

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loads = sorted((key, stats) for key, stats in self._loads().items() if stats is not None)
        for name, text, attribute in SERIES:
            family = GaugeMetricFamily(name, text, labels=["namespace", "llmdeployment"])
            for (namespace, llmdeployment), stats in loads:
                family.add_metric([namespace, llmdeployment], float(getattr(stats, attribute)))
            yield family
        family = GaugeMetricFamily("vllm_operator_autoscaler_desired_replicas",
                                   "Replicas the built-in autoscaler asks for, per autoscaled LLMDeployment.",
                                   labels=["namespace", "llmdeployment"])
        for (namespace, llmdeployment), replicas in sorted(self._desired().items()):
            family.add_metric([namespace, llmdeployment], float(replicas))
        yield family
