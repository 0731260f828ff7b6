"""Apply -> every child exists: single applies, one at a time, timed by watches."""

from __future__ import annotations

import asyncio
import statistics
import time

from bench.report import Row
from bench.rig import Rig, llmdeployment
from bench.sizes import Size
from bench.tracker import expected_children, tracking

NAMESPACE = "bench-apply"
# Lets the previous apply's Pod and status traffic pass, so each apply is timed on its own.
PAUSE_SECONDS = 0.25
P50_TARGET_MS, P99_TARGET_MS = 100, 300


def method(size: Size) -> str:
    return (f"**apply -> children**: {size.applies} LLMDeployments applied one at a time "
            f"({PAUSE_SECONDS:g} s apart) with server-side apply. Timed from sending the apply to the arrival of "
            "the last child (Deployment, Service, cache PVC; a PDB only with several replicas) on the benchmark's "
            "own watches of those kinds, selected by the `llm.vllm-operator.io/llmdeployment` label.")


async def measure(rig: Rig, size: Size) -> Row:
    async with rig.namespace(NAMESPACE) as namespace:
        kinds = expected_children(llmdeployment("probe", namespace))
        async with tracking(rig.kube, namespace, kinds) as tracker:
            latencies = []
            for i in range(size.applies):
                name = f"apply-{i:04d}"
                started = time.monotonic()
                await rig.kube.apply_llmdeployment(llmdeployment(name, namespace))
                await tracker.wait(f"children of {name}", lambda: name in tracker.children_at, 60)
                latencies.append(tracker.children_at[name] - started)
                await asyncio.sleep(PAUSE_SECONDS)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    p50, p95, p99 = (1000 * cuts[i - 1] for i in (50, 95, 99))
    rig.out(f"  apply -> children: p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms, "
            f"max {1000 * max(latencies):.0f} ms")
    return Row(f"apply -> children, p50 / p95 / p99 ({size.applies} applies)",
               f"{p50:.0f} / {p95:.0f} / {p99:.0f} ms",
               f"p50 <= {P50_TARGET_MS} ms, p99 <= {P99_TARGET_MS} ms",
               p50 <= P50_TARGET_MS and p99 <= P99_TARGET_MS)
