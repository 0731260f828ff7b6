"""The simulated engines report the load a test sets, per engine."""

from __future__ import annotations

from devcluster.simengines import METRICS_FILE, with_gauges
from vllm_operator.engines.metrics import parse_sample


def test_a_set_gauge_is_what_the_engine_reports() -> None:
    text = with_gauges(METRICS_FILE.read_text(), {"vllm:num_requests_waiting": 40, "vllm:num_requests_running": 3})
    sample = parse_sample(text, 0.0)
    assert (sample.requests_waiting, sample.requests_running) == (40, 3)
    assert "vllm:num_requests_waiting_by_reason" in text, "look-alike names are left as they are"
