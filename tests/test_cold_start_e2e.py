"""Cold start on the cluster: a Hugging Face model is downloaded by one Job into the cache claim before the engines
start, LLMDeployments on one claim share it, and a download that cannot succeed fails the LLMDeployment with the
hub's reason.

On the simulated GPU nodes kwok completes the Job's Pod without running the puller; on the local-runtime node the
real puller downloads from the local hub (the ``hub`` fixture) and real vLLM serves what it put there."""

from __future__ import annotations

import copy
import os
import signal
from typing import Any

import pytest
import requests
from huggingface_hub import constants
from kubernetes import client

import llmd
from conftest import BIG_REPO, BIG_SIZE, MIB
from devcluster import engine
from devcluster.hub import TINY_REPO, LocalHub
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from vllm_operator.render.puller import COMPONENT

pytestmark = pytest.mark.cluster

CHUNK = constants.DOWNLOAD_CHUNK_SIZE
PULLER_CLIENT = "vllm-operator-puller"  # the User-Agent the puller gives the hub (puller.py LIBRARY)
SHARED_CLAIM = "team-models"


def jobs(cluster: Cluster, namespace: str) -> list[client.V1Job]:
    listed = client.BatchV1Api(cluster.api_client).list_namespaced_job(namespace)
    return [j for j in listed.items if (j.metadata.labels or {}).get("app.kubernetes.io/component") == COMPONENT]


def deployment(cluster: Cluster, namespace: str, name: str) -> client.V1Deployment:
    return client.AppsV1Api(cluster.api_client).read_namespaced_deployment(name, namespace)


def env_of(deployed: client.V1Deployment) -> dict[str, str | None]:
    return {e.name: e.value for e in deployed.spec.template.spec.containers[0].env}


def shared_claim(cluster: Cluster, namespace: str) -> None:
    client.CoreV1Api(cluster.api_client).create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": SHARED_CLAIM},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})


def on_claim(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    manifest = copy.deepcopy(manifest)
    manifest["metadata"]["name"] = name
    manifest["spec"]["cache"] = {"existingClaim": SHARED_CLAIM}
    return manifest


def test_the_model_is_downloaded_by_a_job_before_the_engines_start(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = llmd.example("mistral-awq-hf-token")
    manifest["spec"]["cache"] = {"size": "1Gi"}
    name = manifest["metadata"]["name"]
    llmd.create(cluster.api_client, namespace, manifest)
    ready = llmd.wait_phase(cluster.api_client, namespace, name, "Ready", 90)

    [job] = jobs(cluster, namespace)
    assert job.metadata.name.startswith(f"{name}-cache-pull-")
    assert [(r.kind, r.name, r.controller) for r in job.metadata.owner_references] == [("LLMDeployment", name, True)]
    assert job.status.succeeded == 1
    cache = ready["status"]["cache"]
    assert (cache["phase"], cache["job"], cache["percent"]) == ("Ready", job.metadata.name, 100.0)
    engines = deployment(cluster, namespace, name)
    # Created only once the download was over.
    assert engines.metadata.creation_timestamp >= job.status.completion_time
    env = env_of(engines)
    assert env["HF_HUB_OFFLINE"] == "1" and "HF_TOKEN" not in env
    token = {e.name: e.value_from for e in job.spec.template.spec.containers[0].env}["HF_TOKEN"]
    assert token.secret_key_ref.name == "hf-token"

    # Other files to download: a new Job, and once it is done, the earlier one goes.
    llmd.patch_spec(cluster.api_client, namespace, name, {"model": {"allowPatterns": ["*.json", "*.safetensors"]}})
    edited = wait_for("the second download", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, name)) and obj["metadata"]["generation"] == 2
        and obj["status"].get("observedGeneration") == 2 and obj["status"]["cache"]["phase"] == "Ready" and obj), 60)
    assert edited["status"]["cache"]["job"] != job.metadata.name
    wait_for("only the second Job", lambda: [j.metadata.name for j in jobs(cluster, namespace)]
             == [edited["status"]["cache"]["job"]], 30)


def test_llmdeployments_on_one_claim_share_one_download(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    shared_claim(cluster, namespace)
    example = llmd.example("mistral-awq-hf-token")
    llmd.create(cluster.api_client, namespace, on_claim(example, "first"))
    first = llmd.wait_phase(cluster.api_client, namespace, "first", "Ready", 90)
    llmd.create(cluster.api_client, namespace, on_claim(example, "second"))
    second = llmd.wait_phase(cluster.api_client, namespace, "second", "Ready", 90)

    [job] = jobs(cluster, namespace)
    assert job.metadata.name.startswith(f"{SHARED_CLAIM}-pull-")
    assert job.metadata.owner_references[0].name == "first"
    assert first["status"]["cache"]["job"] == second["status"]["cache"]["job"] == job.metadata.name
    assert "LLMDeployment first" in second["status"]["cache"]["message"]

    # Another model on the same claim is another download.
    other = on_claim(example, "third")
    other["spec"]["model"]["revision"] = "main"
    other["spec"]["model"]["allowPatterns"] = ["*.json", "*.safetensors"]
    llmd.create(cluster.api_client, namespace, other)
    llmd.wait_phase(cluster.api_client, namespace, "third", "Ready", 90)
    assert len(jobs(cluster, namespace)) == 2


def test_a_job_of_the_name_that_is_not_the_operators_is_left_alone(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    shared_claim(cluster, namespace)
    manifest = on_claim(llmd.example("mistral-awq-hf-token"), "mine")
    llmd.create(cluster.api_client, namespace, manifest)
    first = llmd.wait_phase(cluster.api_client, namespace, "mine", "Ready", 90)
    name = first["status"]["cache"]["job"]
    llmd.delete(cluster.api_client, namespace, "mine")
    wait_for("the Job to be collected", lambda: not jobs(cluster, namespace), 60)
    batch = client.BatchV1Api(cluster.api_client)
    batch.create_namespaced_job(namespace, {"metadata": {"name": name}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "x", "image": "busybox", "command": ["true"]}]}}}})

    llmd.create(cluster.api_client, namespace, manifest)
    conflict = wait_for("the conflict in the status", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, "mine"))
        and (llmd.condition(obj, "Ready") or {}).get("reason") == "ChildConflict" and obj), 30)
    assert f"Job {name} already exists" in llmd.condition(conflict, "Ready")["message"]
    assert batch.read_namespaced_job(name, namespace).metadata.owner_references is None
    assert not client.AppsV1Api(cluster.api_client).list_namespaced_deployment(namespace).items


# -- the real puller and real vLLM on the local-runtime node -------------------------------------------------------


def tiny_from_hub(name: str) -> dict[str, Any]:
    """examples/cpu-tiny.yaml, downloaded from the local hub instead of pre-filled."""
    manifest = llmd.example("cpu-tiny")
    manifest["metadata"]["name"] = name
    manifest["spec"]["model"]["name"] = TINY_REPO
    manifest["spec"]["engine"].pop("env")
    return manifest


def puller_pods(cluster: Cluster, namespace: str) -> list[client.V1Pod]:
    return client.CoreV1Api(cluster.api_client).list_namespaced_pod(
        namespace, label_selector=f"app.kubernetes.io/component={COMPONENT}").items


def engine_requests(hub: LocalHub) -> int:
    """Requests to the hub of anyone but the puller (the engines) since the last reset."""
    return sum(1 for r in hub.requests if r.client != PULLER_CLIENT)


@pytest.mark.engine
def test_a_model_from_the_hub_downloads_then_loads_then_serves_without_the_engine_asking_the_hub(
    operator: OperatorProcess, cluster: Cluster, namespace: str, hub: LocalHub
) -> None:
    if not engine.engine_ready() or engine.model_snapshot() is None:
        pytest.fail("the engine venv or the tiny model is missing; `make test` builds them", pytrace=False)
    shared_claim(cluster, namespace)
    # Every file stalls after 1 MB: the weights are seen midway (and the operator's fit check gets its config.json).
    hub.hold(after=1_000_000)
    try:
        llmd.create(cluster.api_client, namespace, on_claim(tiny_from_hub("tiny"), "tiny"))
        downloading = llmd.wait_phase(cluster.api_client, namespace, "tiny", "Downloading", 120)
        midway = wait_for("the download's total in the status", lambda: (
            (obj := llmd.get(cluster.api_client, namespace, "tiny")) and "bytesTotal" in obj["status"].get("cache", {})
            and obj), 60)
        assert midway["status"]["cache"]["bytesTotal"] > 4_000_000 > midway["status"]["cache"].get("bytesDone", 0)
        assert llmd.condition(downloading, "Ready")["reason"] == "Downloading"
        assert not client.AppsV1Api(cluster.api_client).list_namespaced_deployment(namespace).items
        hub.reset_counts()  # the operator's fit check asked before the Job was made; the engines come after
    finally:
        hub.release()
    cached = wait_for("the cache Ready", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, "tiny"))
        and obj["status"].get("cache", {}).get("phase") == "Ready" and obj), 120)
    assert cached["status"]["cache"]["revision"] and cached["status"]["cache"]["bytesDone"] > 4_000_000
    ready = llmd.wait_phase(cluster.api_client, namespace, "tiny", "Ready", 420)
    assert ready["status"]["cache"]["percent"] == 100.0
    [pod] = llmd.owned_pods(cluster.api_client, namespace, "tiny")
    answer = requests.post(f"http://{pod.status.pod_ip}:8000/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": "Hello", "max_tokens": 4}).json()
    assert answer["usage"]["completion_tokens"] > 0
    assert engine_requests(hub) == 0, [r for r in hub.requests if r.client != PULLER_CLIENT]

    # A second LLMDeployment of the same model on the same claim starts without a Job of its own.
    pulled = hub.count(client=PULLER_CLIENT)
    llmd.create(cluster.api_client, namespace, on_claim(tiny_from_hub("tiny-2"), "tiny-2"))
    second = llmd.wait_phase(cluster.api_client, namespace, "tiny-2", "Ready", 420)
    assert second["status"]["cache"]["job"] == cached["status"]["cache"]["job"]
    assert len(jobs(cluster, namespace)) == 1
    assert hub.count(client=PULLER_CLIENT) == pulled and engine_requests(hub) == 0


def test_a_download_killed_midway_resumes_from_the_bytes_on_the_claim(
    operator: OperatorProcess, cluster: Cluster, namespace: str, hub: LocalHub
) -> None:
    manifest = tiny_from_hub("big")
    manifest["spec"]["model"]["name"] = BIG_REPO
    manifest["spec"]["replicas"] = 0  # the download alone: these weights are no model vLLM could load
    hub.hold(after=CHUNK + MIB)  # the client writes to the claim a chunk at a time
    try:
        llmd.create(cluster.api_client, namespace, manifest)
        done = wait_for("a chunk on the claim", lambda: (
            (cache := ((llmd.get(cluster.api_client, namespace, "big") or {}).get("status") or {}).get("cache"))
            and cache.get("bytesDone", 0) >= CHUNK and cache), 120)
        [first] = puller_pods(cluster, namespace)
        hub.reset_counts()
        # As an evicted or OOM-killed Pod: no chance to clean up. The Job's next Pod takes over.
        os.kill(int(first.status.container_statuses[0].container_id.removeprefix("localruntime://")), signal.SIGKILL)
        wait_for("the Job's second Pod", lambda: len(puller_pods(cluster, namespace)) == 2, 120)
    finally:
        hub.release()
    cached = wait_for("the cache Ready", lambda: (
        (cache := ((llmd.get(cluster.api_client, namespace, "big") or {}).get("status") or {}).get("cache"))
        and cache.get("phase") == "Ready" and cache), 180)
    assert cached["bytesDone"] == cached["bytesTotal"] == BIG_SIZE + sum(
        f.size for name, f in hub.repos[BIG_REPO].files.items() if name != "model.safetensors")
    # Every request for the weights since the kill starts past the bytes that were on the claim.
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    starts = [int(r.range.removeprefix("bytes=").split("-")[0]) if r.range else 0 for r in gets]
    assert gets and min(starts) >= done["bytesDone"], (starts, done["bytesDone"])


@pytest.mark.engine
def test_a_repo_that_does_not_exist_fails_with_the_hubs_reason(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = tiny_from_hub("nope")
    manifest["spec"]["model"]["name"] = "local/no-such-model"
    llmd.create(cluster.api_client, namespace, manifest)
    failed = llmd.wait_phase(cluster.api_client, namespace, "nope", "Failed", 180)
    ready = llmd.condition(failed, "Ready")
    assert ready["reason"] == "RepositoryNotFound" and "check model.name" in ready["message"]
    assert failed["status"]["cache"]["phase"] == "Failed"
    [job] = jobs(cluster, namespace)
    assert job.status.failed == 1  # failed at once: no retry can find the repo
    llmd.events_once(cluster.api_client, namespace, "nope", lambda events: any(
        e.type == "Warning" and e.reason == "Failed" and "does not exist" in e.message for e in events))
    assert not client.AppsV1Api(cluster.api_client).list_namespaced_deployment(namespace).items
