"""The fit check on the local cluster, with the operator asking the local hub: a model that cannot fit its
accelerator fails before anything is created, one that fits shows its capacity, and what the check cannot
judge goes ahead as Unknown."""

from __future__ import annotations

import time

import pytest
from kubernetes import client

import llmd
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from test_reconcile_e2e import small
from vllm_operator.cache.fit import SKIP_FIT_CHECK_ANNOTATION

pytestmark = pytest.mark.cluster

NAME = "llama"


def on_one_h100(model: str) -> dict:
    manifest = small(llmd.example("llama3-8b-h100"))
    manifest["metadata"]["name"] = NAME
    manifest["spec"]["model"] = {"name": model}
    del manifest["spec"]["apiKeySecretRef"]
    manifest["spec"]["engine"] = {}  # the model's own context length: 131,072 tokens for Llama 3.1
    return manifest


def children(cluster: Cluster, namespace: str) -> list[str]:
    apps, core = client.AppsV1Api(cluster.api_client), client.CoreV1Api(cluster.api_client)
    return [f"{kind}/{o.metadata.name}" for kind, listed in (
        ("Deployment", apps.list_namespaced_deployment(namespace)), ("Pod", core.list_namespaced_pod(namespace)),
        ("PersistentVolumeClaim", core.list_namespaced_persistent_volume_claim(namespace)),
        ("Service", core.list_namespaced_service(namespace))) for o in listed.items]


def test_70b_on_one_h100_does_not_fit_and_nothing_is_created(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    applied = time.monotonic()
    llmd.create(cluster.api_client, namespace, on_one_h100("meta-llama/Llama-3.1-70B-Instruct"))
    failed = llmd.wait_phase(cluster.api_client, namespace, NAME, "Failed", 30)
    print(f"DoesNotFit {time.monotonic() - applied:.2f}s after the apply")
    ready = llmd.condition(failed, "Ready")
    assert ready["reason"] == "DoesNotFit", ready
    assert "accelerator.count: 4" in ready["message"] and "quantization" in ready["message"], ready["message"]
    time.sleep(2)  # a reconcile that went on would have created its children by now
    assert children(cluster, namespace) == []
    events = client.CoreV1Api(cluster.api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={NAME}").items
    assert any(e.type == "Warning" and "DoesNotFit" in (e.message or "") + (e.reason or "") for e in events)

    # The smallest change the message names makes it fit; the children follow.
    llmd.patch_spec(cluster.api_client, namespace, NAME, {"accelerator": {"count": 4}})
    fits = wait_for("status.capacity Fits", lambda: (
        (o := llmd.get(cluster.api_client, namespace, NAME)) and ((o.get("status") or {}).get("capacity") or {}).get("fit")
        == "Fits" and o), 60)
    capacity = fits["status"]["capacity"]
    assert capacity["kvCacheTokens"] > 0 and capacity["maxConcurrentSequences"] >= 1, capacity
    wait_for("the Deployment", lambda: any(c.startswith("Deployment/") for c in children(cluster, namespace)), 30)


def test_what_the_check_cannot_judge_goes_ahead_as_unknown(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    # Not on the local hub: unknown to the check, which must not stop it.
    llmd.create(cluster.api_client, namespace, on_one_h100("someone/unheard-of"))
    unknown = wait_for("status.capacity Unknown", lambda: (
        (o := llmd.get(cluster.api_client, namespace, NAME)) and ((o.get("status") or {}).get("capacity") or {}).get("fit")
        == "Unknown" and o), 60)
    assert "someone/unheard-of" in unknown["status"]["capacity"]["message"]
    wait_for("the Deployment", lambda: any(c.startswith("Deployment/") for c in children(cluster, namespace)), 30)


def test_the_skip_annotation_lets_a_model_that_does_not_fit_go_ahead(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = on_one_h100("meta-llama/Llama-3.1-70B-Instruct")
    manifest["metadata"]["annotations"] = {SKIP_FIT_CHECK_ANNOTATION: "true"}
    llmd.create(cluster.api_client, namespace, manifest)
    wait_for("the Deployment", lambda: any(c.startswith("Deployment/") for c in children(cluster, namespace)), 30)
    assert "capacity" not in (llmd.get(cluster.api_client, namespace, NAME) or {}).get("status", {})
