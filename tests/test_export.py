"""The operator's per-LLMDeployment engine load series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_operator.engines.export import SERIES, EngineLoadCollector
from vllm_operator.engines.metrics import EngineStats

STATS = EngineStats(requests_running=3, requests_waiting=40, kv_cache_usage_percent=71.5,
                    prompt_tokens_per_second=900.0, generation_tokens_per_second=1234.5, request_errors=0,
                    scraped_replicas=2, last_scrape_time="2026-12-01T00:00:00Z")


def scrape(loads: dict, desired: dict | None = None) -> dict[tuple[str, str, str], float]:
    registry = CollectorRegistry()
    registry.register(EngineLoadCollector(lambda: loads, lambda: desired or {}))
    text = generate_latest(registry).decode()
    return {(s.name, s.labels["namespace"], s.labels["llmdeployment"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_llmdeployment_has_its_load_under_stable_names() -> None:
    got = scrape({("team-a", "llama"): STATS, ("team-b", "idle"): None})
    assert got[("vllm_operator_engine_requests_waiting", "team-a", "llama")] == 40
    assert got[("vllm_operator_engine_kv_cache_usage_percent", "team-a", "llama")] == 71.5
    assert {name for name, *_ in got} == {name for name, _, _ in SERIES}
    scaled = scrape({}, {("team-a", "llama"): 3})
    assert scaled == {("vllm_operator_autoscaler_desired_replicas", "team-a", "llama"): 3}
    assert not any(ns == "team-b" for _, ns, _ in got), "no figures, no series"


def test_a_gone_llmdeployment_leaves_no_series() -> None:
    loads = {("team-a", "llama"): STATS}
    assert scrape(loads)
    loads.clear()
    assert scrape(loads) == {}
