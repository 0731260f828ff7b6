"""The operator's own series that dashboards and alerts read per LLMDeployment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from vllm_operator import observability

PHASE = "vllm_operator_llmdeployment_phase"


def phases() -> dict[tuple[str, str], str]:
    [family] = [metric for metric in REGISTRY.collect() if metric.name == PHASE]
    assert all(sample.value == 1 for sample in family.samples)
    return {(s.labels["namespace"], s.labels["llmdeployment"]): s.labels["phase"] for s in family.samples}


@pytest.fixture(autouse=True)
def no_phases() -> Iterator[None]:
    for key in list(observability._phases):
        observability.set_phase(key, None)
    yield
    for key in list(observability._phases):
        observability.set_phase(key, None)


def test_each_llmdeployment_has_one_series_of_its_current_phase() -> None:
    observability.set_phase(("team-a", "llama"), "Loading")
    observability.set_phase(("team-b", "llama"), "Failed")
    assert phases() == {("team-a", "llama"): "Loading", ("team-b", "llama"): "Failed"}
    observability.set_phase(("team-a", "llama"), "Ready")
    assert phases() == {("team-a", "llama"): "Ready", ("team-b", "llama"): "Failed"}
    observability.set_phase(("team-b", "llama"), None)  # deleted
    assert phases() == {("team-a", "llama"): "Ready"}
    assert REGISTRY.get_sample_value("vllm_operator_llmdeployments", {"phase": "Ready"}) == 1
