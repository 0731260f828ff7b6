"""Live status from real vLLM: the demo's LLMDeployment served by vLLM CPU on the local-runtime
node, loaded with concurrent chat completions, left idle, and killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import llmd
from conftest import TEST_SCRAPE_INTERVAL
from devcluster import engine
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from vllm_operator import api

pytestmark = [pytest.mark.cluster, pytest.mark.engine]

NAME = "tiny"
STATUS_WRITE_VERBS = {"APPLY", "PATCH", "PUT", "POST"}


@pytest.fixture(scope="module")
def served(operator: OperatorProcess, cluster: Cluster) -> Iterator[str]:
    """A namespace where examples/cpu-tiny.yaml is Ready, with its cache pre-filled."""
    with llmd.serving(cluster.api_client, "t-engine", llmd.example("cpu-tiny"), 420) as namespace:
        yield namespace


def kubectl(cluster: Cluster, *args: str) -> str:
    return subprocess.run(["kubectl", "--kubeconfig", str(cluster.kubeconfig), *args],
                          capture_output=True, text=True, check=True).stdout


def engine_status(cluster: Cluster, namespace: str) -> dict[str, Any]:
    status: dict[str, Any] = ((llmd.get(cluster.api_client, namespace, NAME) or {}).get("status") or {})
    return status.get("engine") or {}


def pod_ip(cluster: Cluster, namespace: str) -> str:
    pods = llmd.owned_pods(cluster.api_client, namespace, NAME)
    assert len(pods) == 1 and pods[0].status.pod_ip
    return str(pods[0].status.pod_ip)


async def chat_load(base_url: str, model: str, seconds: float, concurrency: int = 8) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = []
    body = {"model": model, "max_tokens": 200, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me about Kubernetes."}]}
    deadline = time.monotonic() + seconds

    async def user(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
                assert response.status == 200, await response.text()
                answers.append(await response.json())

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(user(session) for _ in range(concurrency)))
    return answers


def test_status_follows_the_engine_load(cluster: Cluster, served: str) -> None:
    namespace = served
    wait_for("the first scrape", lambda: engine_status(cluster, namespace), 6 * TEST_SCRAPE_INTERVAL)
    seen: list[dict[str, Any]] = []

    async def load_and_watch() -> list[dict[str, Any]]:
        load = asyncio.create_task(chat_load(f"http://{pod_ip(cluster, namespace)}:8000", NAME, 6 * TEST_SCRAPE_INTERVAL))
        while not load.done():
            seen.append(await asyncio.to_thread(engine_status, cluster, namespace))
            await asyncio.sleep(TEST_SCRAPE_INTERVAL / 2)
        return await load

    answers = asyncio.run(load_and_watch())
    assert answers and all(a["usage"]["completion_tokens"] > 0 for a in answers)
    assert any(s.get("requestsRunning", 0) > 0 or s.get("generationTokensPerSecond", 0) > 0 for s in seen), seen
    busy = next(s for s in seen if s.get("generationTokensPerSecond", 0) > 0)
    assert busy["ttftSecondsP50"] > 0 and busy["itlSecondsP50"] > 0

    idle = wait_for("the status to show an idle engine", lambda: (
        (s := engine_status(cluster, namespace)).get("generationTokensPerSecond") == 0
        and s.get("requestsRunning") == 0 and s), 6 * TEST_SCRAPE_INTERVAL)
    assert idle["scrapedReplicas"] == 1 and "ttftSecondsP50" not in idle

    header, row = kubectl(cluster, "get", "llmd", "-n", namespace).splitlines()[:2]
    names = header.split()
    assert names[:11] == ["NAME", "MODEL", "ACCEL", "READY", "PHASE", "CACHE", "RUNNING", "WAITING", "KV%", "TOK/S",
                          "AGE"]
    # Cells by the header's column starts: CACHE is empty for a cache filled before the engines came.
    starts = [header.index(name) for name in names] + [None]
    cells = {name: row[start:end].strip() for name, start, end in zip(names, starts, starts[1:])}
    assert [cells[n] for n in names[:10]] == [NAME, engine.MODEL_ID, "cpu", "1/1", "Ready", "", "0", "0", "0", "0"]


def status_writes(cluster: Cluster) -> float:
    """LLMDeployment status writes the apiserver has served since it started, from its /metrics."""
    text = kubectl(cluster, "get", "--raw", "/metrics")
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            labels = sample.labels
            if (sample.name == "apiserver_request_total" and labels.get("resource") == api.PLURAL
                    and labels.get("subresource") == "status" and labels.get("verb") in STATUS_WRITE_VERBS):
                total += sample.value
    return total


def test_an_idle_engine_causes_no_status_writes(cluster: Cluster, served: str) -> None:
    wait_for("an idle status", lambda: engine_status(cluster, served).get("generationTokensPerSecond") == 0,
             6 * TEST_SCRAPE_INTERVAL)
    time.sleep(TEST_SCRAPE_INTERVAL)  # the write of the idle figures itself may still be under way
    before = status_writes(cluster)
    scraped_before = engine_status(cluster, served)["lastScrapeTime"]
    time.sleep(5 * TEST_SCRAPE_INTERVAL)
    assert status_writes(cluster) == before
    assert engine_status(cluster, served)["lastScrapeTime"] == scraped_before


def test_a_killed_engine_is_degraded_then_ready_again(cluster: Cluster, served: str) -> None:
    namespace = served
    pod = llmd.owned_pods(cluster.api_client, namespace, NAME)[0]
    pid = int(pod.status.container_statuses[0].container_id.removeprefix("localruntime://"))
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    degraded = llmd.wait_phase(cluster.api_client, namespace, NAME, "Degraded", 2 * TEST_SCRAPE_INTERVAL + 3)
    print(f"Degraded {time.monotonic() - killed:.1f}s after the kill")
    message = llmd.condition(degraded, "Degraded")["message"]
    assert pod.metadata.name in message

    # While the engine starts again, status.startup names the stage its log shows.
    stages: set[str] = set()

    def ready_again() -> dict[str, Any] | None:
        obj = llmd.get(cluster.api_client, namespace, NAME) or {}
        status = obj.get("status") or {}
        stages.update(r["stage"] for r in (status.get("startup") or {}).get("replicas") or [])
        return obj if status.get("phase") == "Ready" else None

    ready = wait_for("Ready again", ready_again, 300, 0.5)
    # An entry exists only once the log was read; which stages a quick restart shows depends on the timing.
    assert stages, "no stage read from the engine's log"
    assert "startup" not in ready["status"]
    restarted = llmd.owned_pods(cluster.api_client, namespace, NAME)[0]
    assert restarted.status.container_statuses[0].restart_count >= 1
    assert llmd.condition(ready, "Degraded")["status"] == "False"


def test_an_engine_that_cannot_load_its_model_reports_why(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    # Offline and with an empty cache, as a cluster without a Hugging Face token or network would be.
    llmd.create(cluster.api_client, namespace, llmd.example("cpu-tiny"))

    def reported() -> dict[str, Any] | None:
        degraded = llmd.condition(llmd.get(cluster.api_client, namespace, NAME), "Degraded") or {}
        return degraded if degraded.get("reason") in ("EngineExited", "EngineCrashLooping") else None

    degraded = wait_for("the failed start in the Degraded condition", reported, 240, 1)
    assert degraded["status"] == "True"
    assert "exit code 1" in degraded["message"]
    # The last lines of the engine's own error come along, so `kubectl describe` says what happened.
    assert "LocalEntryNotFoundError" in degraded["message"], degraded["message"]
    assert operator.process is not None and operator.process.poll() is None
