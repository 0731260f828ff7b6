"""The built-in autoscaler with real vLLM on the local runtime: chat load on the tiny model adds a
second engine, both serve, and the count returns to one once the load stops."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

import pytest

import llmd
from devcluster import engine
from devcluster.operatorproc import OperatorProcess
from devcluster.prefill import prefill_model_cache
from devcluster.pytest_plugin import Cluster, wait_for
from test_engine_e2e import chat_load

pytestmark = [pytest.mark.cluster, pytest.mark.engine]

NAME = "tiny"
PER_REPLICA = 1
USERS = 4  # asks for two replicas even between turns
SCALE_DOWN_DELAY = 300  # no scale-down this long after the scale-up: the second engine starts meanwhile


def ready_ips(cluster: Cluster, namespace: str) -> list[str]:
    return [p.status.pod_ip for p in llmd.owned_pods(cluster.api_client, namespace, NAME)
            if p.status.pod_ip and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]


def answers(ip: str) -> bool:
    body = {"model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]}
    request = urllib.request.Request(f"http://{ip}:8000/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status == 200 and json.load(response)["usage"]["completion_tokens"] > 0


def test_chat_load_adds_an_engine_and_idleness_removes_it(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    if not engine.engine_ready() or engine.model_snapshot() is None:
        pytest.fail("the engine venv or the tiny model is missing; `make test` builds them", pytrace=False)
    manifest = llmd.example("cpu-tiny")
    manifest["spec"]["cache"]["accessMode"] = "ReadWriteMany"  # two engines read one claim
    manifest["spec"]["autoscaling"] = {
        "minReplicas": 1, "maxReplicas": 2,
        "targets": [{"metric": "requestsPerReplica", "value": PER_REPLICA}],
        # A lull between requests removes no replica; the second engine has time to start once the load stops.
        "behavior": {"scaleDownStabilizationSeconds": 60, "scaleDownDelaySeconds": SCALE_DOWN_DELAY},
    }
    llmd.create(cluster.api_client, namespace, manifest)
    prefill_model_cache(cluster.api_client, namespace, NAME)
    llmd.wait_phase(cluster.api_client, namespace, NAME, "Ready", 420)
    first = ready_ips(cluster, namespace)
    assert len(first) == 1

    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():  # rounds of chat, until the autoscaler adds a replica
            asyncio.run(chat_load(f"http://{first[0]}:8000", NAME, 10, concurrency=USERS))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        wait_for("the autoscaler to ask for 2 replicas", lambda: (
            (obj := llmd.get(cluster.api_client, namespace, NAME)) and obj["spec"].get("replicas", 1) == 2), 120, 2)
    finally:
        # Two cores: an engine starting beside one that decodes for four users takes many minutes.
        stop.set()
        loader.join(60)
    both = wait_for("a second engine Ready", lambda: len(ips := ready_ips(cluster, namespace)) == 2 and ips,
                    SCALE_DOWN_DELAY - 30, 2)
    scaled = llmd.get(cluster.api_client, namespace, NAME)
    assert scaled is not None and scaled["spec"]["replicas"] == 2
    assert "requestsPerReplica" in scaled["status"]["autoscaling"]["reason"], scaled["status"]["autoscaling"]
    assert all(answers(ip) for ip in both), "both engines serve"
    # An edit of the behavior applies to the running autoscaler: a shorter delay lets the idle engine go now.
    llmd.patch_spec(cluster.api_client, namespace, NAME, {"autoscaling": {"behavior": {"scaleDownDelaySeconds": 30}}})

    wait_for("back to one engine once idle", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, NAME)) and obj["spec"]["replicas"] == 1
        and len(llmd.owned_pods(cluster.api_client, namespace, NAME)) == 1), SCALE_DOWN_DELAY + 120, 2)
    events = llmd.events_once(cluster.api_client, namespace, NAME,
                              lambda events: sum(e.reason == "Scaled" for e in events) >= 2)
    scaled = sorted(e.message.split(" replicas")[0] for e in events if e.reason == "Scaled")
    assert scaled == ["1 -> 2", "2 -> 1"], [e.message for e in events if e.reason == "Scaled"]
