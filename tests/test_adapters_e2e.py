"""LoRA adapters on real vLLM: two PEFT adapters of the tiny model, one from the (local) hub and one from a claim,
and one of too high a rank, listed in spec.adapters: the hub's is downloaded by a Job into the cache claim, both
are loaded into the running engine through its API key and answer differently from the base model, one removed
is unloaded with no restart, and a replacement engine has them before it is Ready."""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

import llmd
from devcluster import lora
from devcluster.hub import LocalHub, folder_repo
from devcluster.localruntime.spec import mount_namespaces
from devcluster.operatorproc import OperatorProcess
from devcluster.prefill import claim_folder
from devcluster.pytest_plugin import Cluster, wait_for
from test_gateway import GatewayProcess
from vllm_operator.render.adapters import READINESS_GATE

pytestmark = [pytest.mark.cluster, pytest.mark.engine]

LOAD_TIMEOUT = 420
NAME = "tiny"
CLAIM = "lora-weights"
KEY = "sk-adapters-test"
# name -> (rank, seed); the tiny model's engines take ranks up to 16.
ADAPTERS = {"sql": (8, 1), "poet": (16, 2), "huge": (32, 3)}
HUB_REPO = "local/sql-lora"


def source(name: str) -> str:
    return f"hf://{HUB_REPO}" if name == "sql" else f"pvc://{CLAIM}/adapters/{name}"


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("adapters")
    return {name: lora.make(out / name, rank, seed) for name, (rank, seed) in ADAPTERS.items()}


@pytest.fixture(scope="module")
def served(operator: OperatorProcess, cluster: Cluster, hub: LocalHub,
           adapter_folders: dict[str, Path]) -> Iterator[str]:
    if not mount_namespaces():
        pytest.skip("the local runtime can hand an engine its volumes' container paths only in a mount namespace, "
                    "which this machine refuses (docs/local-runtime.md)")
    hub.repos[HUB_REPO] = folder_repo(HUB_REPO, adapter_folders["sql"])

    def prepare(namespace: str) -> None:
        core = client.CoreV1Api(cluster.api_client)
        core.create_namespaced_secret(namespace, {"metadata": {"name": "api"}, "stringData": {"key": KEY}})
        core.create_namespaced_persistent_volume_claim(namespace, {
            "metadata": {"name": CLAIM},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
        folder = claim_folder(cluster.api_client, namespace, CLAIM)
        for name, made in adapter_folders.items():
            shutil.copytree(made, folder / "adapters" / name)

    manifest = llmd.example("cpu-tiny")
    manifest["spec"]["engine"]["maxLoraRank"] = 16
    manifest["spec"]["apiKeySecretRef"] = {"name": "api", "key": "key"}
    manifest["spec"]["adapters"] = [{"name": name, "source": source(name)} for name in ADAPTERS]
    with llmd.serving(cluster.api_client, "t-adapters", manifest, LOAD_TIMEOUT, prepare) as namespace:
        yield namespace


def call(pod: client.V1Pod, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(f"http://{pod.status.pod_ip}:8000{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        found: dict[str, Any] = json.loads(answer.read())
        return found


def listed(pod: client.V1Pod) -> set[str]:
    return {model["id"] for model in call(pod, "/v1/models")["data"]}


def says(pod: client.V1Pod, model: str) -> str:
    answer = call(pod, "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "temperature": 0,
        "ignore_eos": True})
    return str(answer["choices"][0]["message"]["content"])


def adapter_status(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    status = (llmd.get(cluster.api_client, namespace, NAME) or {}).get("status") or {}
    return {adapter["name"]: adapter for adapter in status.get("adapters") or []}


def test_the_adapters_are_loaded_and_answer_differently_and_a_too_high_rank_is_reported(
        cluster: Cluster, hub: LocalHub, served: str) -> None:
    # The engine may be Ready before the hub's adapter is downloaded: that one is loaded when it is.
    seen: dict[str, Any] = {}

    def settled() -> dict[str, dict[str, Any]] | None:
        seen["status"] = found = adapter_status(cluster, served)
        return found if len(found) == 3 and found["huge"]["state"] == "Failed" and found["sql"]["state"] == "Loaded" \
            else None

    try:
        status = wait_for("status.adapters of every adapter", settled, 120)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen.get('status')}") from None
    [pod] = llmd.owned_pods(cluster.api_client, served, NAME)
    assert listed(pod) == {NAME, "sql", "poet"}
    base = says(pod, NAME)
    assert says(pod, "sql") != base and says(pod, "poet") != base, base
    assert {name: (a["state"], a["loadedReplicas"], a["replicas"]) for name, a in status.items()} == {
        "sql": ("Loaded", 1, 1), "poet": ("Loaded", 1, 1), "huge": ("Failed", 0, 1)}
    assert "LoRA rank 32 is greater than max_lora_rank 16" in status["huge"]["message"]
    # The hub's adapter came through a download Job into the cache claim, and loads from its commit there.
    download = status["sql"]["download"]
    assert download["phase"] == "Ready" and download["revision"] == hub.repos[HUB_REPO].commit
    roots = {m["id"]: m["root"] for m in call(pod, "/v1/models")["data"]}
    assert roots["sql"].endswith(f"/models--local--sql-lora/snapshots/{download['revision']}"), roots
    assert (llmd.get(cluster.api_client, served, NAME) or {})["status"]["loadedAdapters"] == 2
    events = llmd.events_once(cluster.api_client, served, NAME, lambda events: {"AdapterLoaded", "AdapterFailed"}
                              <= {e.reason for e in events})
    reasons = {(e.reason, e.message) for e in events}
    assert ("AdapterLoaded", "adapter sql is loaded in all 1 running engines") in reasons
    assert any(reason == "AdapterFailed" and "max_lora_rank 16" in message for reason, message in reasons)


def test_the_gateway_lists_and_routes_the_loaded_adapters(
        cluster: Cluster, served: str, tmp_path: Path) -> None:
    gateway = GatewayProcess(cluster, served, tmp_path / "gateway.log")
    try:
        openai_client = gateway.client(api_key=KEY)
        models = wait_for("the gateway listing the loaded adapters", lambda: (
            found if {"sql", "poet"} <= set(found := {m.id: m for m in openai_client.models.list()}) else None), 30)
        assert "huge" not in models and models["sql"].model_extra["parent"] == NAME
        answer = openai_client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "Hello"}],
                                                       max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        [pod] = llmd.owned_pods(cluster.api_client, served, NAME)
        assert answer.model == "sql" and answer.choices[0].message.content == says(pod, "sql")
    finally:
        gateway.stop()


def test_a_removed_adapter_is_unloaded_from_the_running_engine_without_a_restart(
        cluster: Cluster, served: str) -> None:
    [before] = llmd.owned_pods(cluster.api_client, served, NAME)
    llmd.patch_spec(cluster.api_client, served, NAME, {"adapters": [
        {"name": name, "source": source(name)} for name in ("sql", "huge")]})
    wait_for("poet unloaded", lambda: "poet" not in listed(before), 60)
    [after] = llmd.owned_pods(cluster.api_client, served, NAME)
    assert after.metadata.uid == before.metadata.uid
    assert after.status.container_statuses[0].restart_count == before.status.container_statuses[0].restart_count
    assert listed(after) == {NAME, "sql"}
    wait_for("poet gone from status.adapters", lambda: set(adapter_status(cluster, served)) == {"sql", "huge"}, 30)


def ready(pod: client.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def test_an_engine_that_restarts_in_its_pod_is_ready_again_only_with_its_adapters(
        cluster: Cluster, served: str) -> None:
    [before] = llmd.owned_pods(cluster.api_client, served, NAME)
    restarts = before.status.container_statuses[0].restart_count
    os.kill(int(before.status.container_statuses[0].container_id.removeprefix("localruntime://")), signal.SIGKILL)

    def ready_again() -> client.V1Pod | None:
        [pod] = llmd.owned_pods(cluster.api_client, served, NAME)
        return pod if pod.status.container_statuses[0].restart_count > restarts and ready(pod) else None

    # Polled often: the check below is of the moment it turns Ready.
    again = wait_for("the engine Ready again", ready_again, LOAD_TIMEOUT, interval=0.2)
    # The gate opened for the engine before the restart was closed, and opened again once it had the adapter.
    assert "sql" in listed(again)


def test_a_replacement_engine_has_the_adapters_before_it_is_ready(cluster: Cluster, served: str) -> None:
    core = client.CoreV1Api(cluster.api_client)
    [old] = llmd.owned_pods(cluster.api_client, served, NAME)
    core.delete_namespaced_pod(old.metadata.name, served)

    def ready_replacement() -> client.V1Pod | None:
        pods = [p for p in llmd.owned_pods(cluster.api_client, served, NAME) if p.metadata.uid != old.metadata.uid]
        found = [p for p in pods if ready(p)]
        return found[0] if found else None

    new = wait_for("a replacement engine Ready", ready_replacement, LOAD_TIMEOUT, interval=0.2)
    # The moment it is Ready for traffic, the engine has the adapter: its readiness gate waited for it.
    assert "sql" in listed(new)
    gate = next(c for c in new.status.conditions if c.type == READINESS_GATE)
    assert gate.status == "True"
