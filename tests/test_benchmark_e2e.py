"""Serving benchmarks on the local cluster: `vllm-operator bench` against the tiny model served by real vLLM
on the local-runtime node, one run at a time; and a request on a model that is not Ready makes no Job."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

import llmd
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from test_engine_e2e import NAME, engine_status, served  # noqa: F401  (the module's fixture)
from vllm_operator import api

pytestmark = pytest.mark.cluster
AGREEMENT = 3.0


def bench(cluster: Cluster, namespace: str, name: str, *options: str) -> str:
    """Run `vllm-operator bench`; the request id it printed."""
    out = subprocess.run([sys.executable, "-m", "vllm_operator.cli", "bench", name, "-n", namespace,
                          "--kubeconfig", str(cluster.kubeconfig), *options],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1]  # "benchmark <id> requested for ..."


def benchmark_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = ((llmd.get(cluster.api_client, namespace, name) or {}).get("status") or {})
    return status.get("benchmark") or {}


def jobs(cluster: Cluster, namespace: str) -> list[client.V1Job]:
    return list(client.BatchV1Api(cluster.api_client).list_namespaced_job(namespace).items)


def explain(cluster: Cluster, namespace: str, name: str) -> Callable[[], str]:
    """What the benchmark's status, Jobs and Pods (with their logs' tails) say: a timeout's evidence."""
    def describe() -> str:
        core = client.CoreV1Api(cluster.api_client)
        lines = [f"status.benchmark: {benchmark_status(cluster, namespace, name)}",
                 f"phase: {((llmd.get(cluster.api_client, namespace, name) or {}).get('status') or {}).get('phase')}"]
        lines += [f"Job {j.metadata.name}: {j.status.to_dict()}" for j in jobs(cluster, namespace)]
        for pod in core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=benchmark").items:
            lines.append(f"Pod {pod.metadata.name}: {pod.status.phase} {pod.status.container_statuses}")
            try:
                lines.append(core.read_namespaced_pod_log(pod.metadata.name, namespace, tail_lines=30))
            except client.ApiException as exc:
                lines.append(f"(no log: {exc.status})")
        return "\n".join(lines)
    return describe


def events(cluster: Cluster, namespace: str, name: str) -> list[client.CoreV1Event]:
    return list(client.CoreV1Api(cluster.api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}").items)


def reasons(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return [e.reason for e in events(cluster, namespace, name)]


def test_a_request_on_a_model_that_is_not_ready_makes_no_job(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = llmd.example("cpu-tiny")
    manifest["metadata"]["name"] = "unplaced"
    manifest["spec"]["nodeSelector"] = {"no-such-node": "true"}  # stays Pending
    llmd.create(cluster.api_client, namespace, manifest)
    llmd.wait_phase(cluster.api_client, namespace, "unplaced", "Pending", 60)
    request_id = bench(cluster, namespace, "unplaced", "--num-prompts", "5")
    waiting = wait_for("the waiting request in the status",
                       lambda: (s := benchmark_status(cluster, namespace, "unplaced")).get("id") == request_id and s, 30)
    assert waiting["phase"] == "Waiting" and "Ready" in waiting["message"]
    wait_for("the BenchmarkWaiting Event", lambda: "BenchmarkWaiting" in reasons(cluster, namespace, "unplaced"), 30)
    assert jobs(cluster, namespace) == []


@pytest.mark.engine
def test_bench_runs_vllms_serving_benchmark_one_at_a_time(cluster: Cluster, served: str) -> None:  # noqa: F811
    namespace = served
    options = ("--num-prompts", "60", "--input-len", "64", "--output-len", "64", "--request-rate", "20")
    first = bench(cluster, namespace, NAME, *options)
    wait_for("the first benchmark to run",
             lambda: benchmark_status(cluster, namespace, NAME).get("phase") == "Running", 30)
    second = bench(cluster, namespace, NAME, *options)
    engine_seen: list[dict[str, Any]] = []

    def second_done() -> dict[str, Any] | None:
        status = benchmark_status(cluster, namespace, NAME)
        engine_seen.append(engine_status(cluster, namespace))
        assert len(jobs(cluster, namespace)) <= 1  # the second waits for the first: never two at once
        return status if status.get("id") == second and status.get("phase") in ("Succeeded", "Failed") else None

    # A run takes about 10 s here; the Job's own deadline is what a user would wait for at most. The first's result
    # holds status.benchmark only until the waiting request starts, a moment later: its Event keeps it.
    done = wait_for("both benchmarks' results", second_done, 600, 0.5, explain(cluster, namespace, NAME))

    def succeeded() -> dict[str, str]:
        return {e.message.split(":")[0]: e.message for e in events(cluster, namespace, NAME)
                if e.reason == "BenchmarkSucceeded"}

    # Events are posted after the status write.
    finished = wait_for("an Event for each result", lambda: len(found := succeeded()) >= 2 and found, 30)
    assert set(finished) == {f"benchmark {first}", f"benchmark {second}"}, finished
    assert "0 of 60 requests failed" in finished[f"benchmark {first}"]
    waited = [e.message for e in events(cluster, namespace, NAME) if e.reason == "BenchmarkWaiting"]
    assert any(f"request {second} waits for it to finish" in m for m in waited), waited
    assert done["phase"] == "Succeeded", done
    # ... and the status keeps it as the previous request's.
    earlier = done["previous"]
    assert earlier["id"] == first and earlier["phase"] == "Succeeded", earlier
    assert earlier["results"]["completedRequests"] == 60 and earlier["results"]["failedRequests"] == 0
    results = done["results"]
    assert results["completedRequests"] == 60 and results["failedRequests"] == 0
    assert results["requestThroughput"] > 0 and results["outputTokensPerSecond"] > 0
    assert 0 < results["ttftSecondsP50"] <= results["ttftSecondsP99"]
    assert 0 < results["itlSecondsP50"] <= results["itlSecondsP99"]
    assert done["settings"] == {"dataset": "random", "numPrompts": 60, "inputLen": 64, "outputLen": 64,
                                "requestRate": 20.0}
    assert done["startTime"] <= done["completionTime"]
    # The engine's own figures, scraped while the benchmarks ran, saw that load, with latencies that agree with the
    # benchmark's own: status.engine's percentiles come from the engine's histogram buckets over a scrape
    # interval, so agreeing is being within a factor of the benchmark's p50..p99, not equal.
    busy = [s for s in engine_seen if s.get("generationTokensPerSecond", 0) > 0 and "itlSecondsP50" in s]
    assert busy, engine_seen

    def agrees(seen: float, p50: float, p99: float) -> bool:
        return p50 / AGREEMENT <= seen <= p99 * AGREEMENT

    assert any(agrees(s["itlSecondsP50"], results["itlSecondsP50"], results["itlSecondsP99"]) for s in busy), (
        results, busy)
    # The engine times the first token from the request's arrival in it; the benchmark adds the HTTP round trip and
    # the API server's work, which on a busy CPU can be most of it. So the engine's TTFT is at most the benchmark's
    # (the first run's engine was cold: its TTFT is the larger).
    ttft_p99 = max(results["ttftSecondsP99"], earlier["results"]["ttftSecondsP99"])
    assert any(0 < s["ttftSecondsP50"] <= ttft_p99 * AGREEMENT for s in busy), (results, earlier, busy)
    report = client.CoreV1Api(cluster.api_client).read_namespaced_config_map(f"{NAME}-benchmark", namespace)
    owner = llmd.get(cluster.api_client, namespace, NAME)
    assert owner is not None
    assert [(r.kind, r.uid, r.controller) for r in report.metadata.owner_references] == [
        (api.KIND, owner["metadata"]["uid"], True)]
    assert '"p99_ttft_ms"' in report.data["report.json"] and second in report.data["report.json"]
    assert {"BenchmarkStarted", "BenchmarkWaiting", "BenchmarkSucceeded"} <= set(reasons(cluster, namespace, NAME))
    wait_for("the finished Jobs to go", lambda: jobs(cluster, namespace) == [], 60)
