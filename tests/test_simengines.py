"""The simulated engines report the load a test sets, per engine."""

from __future__ import annotations

import asyncio

from devcluster.operatorproc import free_port
from devcluster.simengines import METRICS_FILE, Engines, MetricsBody, with_gauges
from vllm_operator.engines.metrics import parse_sample


def test_a_set_gauge_is_what_the_engine_reports() -> None:
    text = with_gauges(METRICS_FILE.read_text(), {"vllm:num_requests_waiting": 40, "vllm:num_requests_running": 3})
    sample = parse_sample(text, 0.0)
    assert (sample.requests_waiting, sample.requests_running) == (40, 3)
    assert "vllm:num_requests_waiting_by_reason" in text, "look-alike names are left as they are"


def test_a_gone_engines_load_does_not_pass_to_the_next_pod_at_its_address() -> None:
    engines = Engines("127.250.0.0/24", MetricsBody(METRICS_FILE.read_text()), "idle", port=free_port())

    async def body() -> None:
        await engines.serve("127.250.0.7")
        engines.gauges["127.250.0.7"] = {"vllm:num_requests_waiting": 40}
        await engines.forget("127.250.0.7")

    asyncio.run(body())
    assert "127.250.0.7" not in engines.gauges
