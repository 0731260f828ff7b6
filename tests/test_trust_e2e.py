"""Reconcile a platform team can trust, on the local cluster: every edit applied, removals
included; nothing written that is not the operator's; the cache claim kept when asked; nothing
re-created while an LLMDeployment is being deleted; failures of the children in the status."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import llmd
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from vllm_operator import api
from vllm_operator.render.manifests import SELECTOR_LABEL, cache_claim_name
from test_reconcile_e2e import apps, core, read_or_none, small

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]
SIMULATED = {"node-role.vllm-operator.io/simulated": "true"}


def replace_spec(cluster: Cluster, namespace: str, name: str, spec: Obj) -> Obj:
    """What `kubectl apply` of an edited file does to fields the file no longer has: they go."""
    for _ in range(10):
        current = llmd.get(cluster.api_client, namespace, name)
        assert current is not None
        current["spec"] = spec
        try:
            replaced: Obj = llmd.custom(cluster.api_client).replace_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, current)
        except ApiException as exc:
            if exc.status != 409:  # the operator wrote the status meanwhile: read again
                raise
            continue
        return replaced
    raise AssertionError(f"{name} kept changing under the replace")


def wait_current(cluster: Cluster, namespace: str, name: str, timeout: float = 30) -> Obj:
    """The LLMDeployment once its status describes its current generation."""
    return wait_for(f"status of {name} to catch up with its generation", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, name))
        and obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"] and obj), timeout)


def pod_template(cluster: Cluster, namespace: str, name: str) -> client.V1PodTemplateSpec:
    return apps(cluster).read_namespaced_deployment(name, namespace).spec.template


def test_fields_removed_from_the_spec_are_removed_from_the_children(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = small(llmd.example("llama3-8b-h100"))
    # A cache filled beforehand: no download Job, whose Pod no node labelled team=a could run, holds the engines back.
    manifest["spec"]["engine"]["env"] = [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    name = manifest["metadata"]["name"]
    bare = copy.deepcopy(manifest["spec"])
    del bare["accelerator"]["product"]
    full = copy.deepcopy(manifest["spec"])
    full.update(
        nodeSelector={"team": "a"},
        podAnnotations={"example.com/owner": "team-a"},
        affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}]}},
        resources={"limits": {"memory": "64Gi"}},
        service={"annotations": {"example.com/lb": "internal"}},
    )
    manifest["spec"] = full
    llmd.create(cluster.api_client, namespace, manifest)
    wait_for("the Deployment with every field", lambda: (
        (d := read_or_none(apps(cluster).read_namespaced_deployment, name, namespace))
        and d.spec.template.spec.affinity is not None), 30)

    replace_spec(cluster, namespace, name, bare)
    wait_current(cluster, namespace, name)

    def removed() -> bool:
        template = pod_template(cluster, namespace, name)
        pod = template.spec
        service = core(cluster).read_namespaced_service(name, namespace)
        return (
            not pod.node_selector
            and pod.affinity is None
            and "example.com/owner" not in (template.metadata.annotations or {})
            and "memory" not in ((pod.containers[0].resources.limits or {}))
            and "example.com/lb" not in (service.metadata.annotations or {})
        )

    wait_for("every removed field to leave the children", removed, 30)
    # Accelerator limits are still there: only what the spec no longer says went.
    assert pod_template(cluster, namespace, name).spec.containers[0].resources.limits == {"nvidia.com/gpu": "1"}


def claim_owners(cluster: Cluster, namespace: str, name: str) -> list[str]:
    claim = core(cluster).read_namespaced_persistent_volume_claim(cache_claim_name(name), namespace)
    return [ref.uid for ref in claim.metadata.owner_references or []]


def children_gone(cluster: Cluster, namespace: str, name: str) -> bool:
    return (read_or_none(apps(cluster).read_namespaced_deployment, name, namespace) is None
            and read_or_none(core(cluster).read_namespaced_service, name, namespace) is None)


@pytest.mark.parametrize("retain", [True, False], ids=["switched-to-retain", "switched-to-drop"])
def test_the_cache_claim_follows_retain_on_delete_both_ways(
    operator: OperatorProcess, cluster: Cluster, namespace: str, retain: bool
) -> None:
    manifest = small(llmd.example("cpu-qwen"))
    manifest["spec"]["cache"]["retainOnDelete"] = not retain
    created = llmd.create(cluster.api_client, namespace, manifest)
    uid = created["metadata"]["uid"]
    wait_for("the cache claim", lambda: read_or_none(
        core(cluster).read_namespaced_persistent_volume_claim, cache_claim_name("qwen-cpu"), namespace), 30)
    assert claim_owners(cluster, namespace, "qwen-cpu") == ([] if not retain else [uid])

    llmd.patch_spec(cluster.api_client, namespace, "qwen-cpu", {"cache": {"retainOnDelete": retain}})
    wait_for("the claim's owner reference to follow retainOnDelete",
             lambda: claim_owners(cluster, namespace, "qwen-cpu") == ([] if retain else [uid]), 30)

    llmd.delete(cluster.api_client, namespace, "qwen-cpu")
    wait_for("the garbage collector to remove the Deployment and Service",
             lambda: children_gone(cluster, namespace, "qwen-cpu"), 60)
    if retain:
        time.sleep(2)  # the collector handles the claim in the same pass: give it time to get it wrong
        claim = core(cluster).read_namespaced_persistent_volume_claim(cache_claim_name("qwen-cpu"), namespace)
        assert claim.metadata.deletion_timestamp is None
    else:
        wait_for("the claim to be collected", lambda: read_or_none(
            core(cluster).read_namespaced_persistent_volume_claim, cache_claim_name("qwen-cpu"), namespace) is None, 60)


def foreign_objects(namespace: str, name: str) -> dict[str, Obj]:
    """Objects another team made, named as the operator would name the children of ``name``."""
    return {
        "Service": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
                    "spec": {"selector": {"app": "theirs"}, "ports": [{"name": "web", "port": 80}]}},
        "Deployment": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace},
                       "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "theirs"}},
                                "template": {"metadata": {"labels": {"app": "theirs"}}, "spec": {
                                    "nodeSelector": SIMULATED,
                                    "containers": [{"name": "web", "image": "registry.k8s.io/pause:3.10"}]}}}},
        "PersistentVolumeClaim": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                  "metadata": {"name": cache_claim_name(name), "namespace": namespace},
                                  "spec": {"accessModes": ["ReadWriteOnce"],
                                           "resources": {"requests": {"storage": "1Gi"}}}},
    }


def read_foreign(cluster: Cluster, namespace: str, kind: str, name: str) -> Any:
    read = {
        "Service": core(cluster).read_namespaced_service,
        "Deployment": apps(cluster).read_namespaced_deployment,
        "PersistentVolumeClaim": core(cluster).read_namespaced_persistent_volume_claim,
    }[kind]
    return read_or_none(read, name, namespace)


@pytest.mark.parametrize("kind", ["Service", "Deployment", "PersistentVolumeClaim"])
def test_an_object_of_the_same_name_that_is_not_ours_is_left_alone(
    operator: OperatorProcess, cluster: Cluster, namespace: str, kind: str
) -> None:
    foreign = foreign_objects(namespace, "qwen-cpu")[kind]
    utils_create = {
        "Service": core(cluster).create_namespaced_service,
        "Deployment": apps(cluster).create_namespaced_deployment,
        "PersistentVolumeClaim": core(cluster).create_namespaced_persistent_volume_claim,
    }[kind]
    utils_create(namespace, foreign)
    child_name = foreign["metadata"]["name"]
    before = read_foreign(cluster, namespace, kind, child_name)

    llmd.create(cluster.api_client, namespace, small(llmd.example("cpu-qwen")))
    conflicted = wait_for("the ChildConflict condition", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, "qwen-cpu"))
        and (llmd.condition(obj, "Degraded") or {}).get("reason") == "ChildConflict" and obj), 30)
    message = llmd.condition(conflicted, "Degraded")["message"]
    assert f"{kind} {child_name} already exists" in message and "delete or rename it" in message
    assert conflicted["status"]["phase"] != "Ready"
    llmd.events_once(cluster.api_client, namespace, "qwen-cpu", lambda events: any(
        e.reason == "ChildConflict" and e.type == "Warning" for e in events))

    after = read_foreign(cluster, namespace, kind, child_name)
    # Controllers of the cluster update its status; the operator must not appear among its writers.
    assert {m.manager for m in after.metadata.managed_fields or []}.isdisjoint({"vllm-operator"})
    assert not after.metadata.owner_references and not (after.metadata.labels or {})

    llmd.delete(cluster.api_client, namespace, "qwen-cpu")
    wait_for("the LLMDeployment to go", lambda: llmd.get(cluster.api_client, namespace, "qwen-cpu") is None, 30)
    time.sleep(3)  # the garbage collector would have acted on an owner reference by now
    still = read_foreign(cluster, namespace, kind, child_name)
    assert still is not None and still.metadata.deletion_timestamp is None
    assert still.metadata.uid == before.metadata.uid


def test_a_pod_made_by_hand_with_the_label_is_no_replica(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    llmd.create(cluster.api_client, namespace, small(llmd.example("cpu-qwen")))
    llmd.wait_phase(cluster.api_client, namespace, "qwen-cpu", "Ready", 90)
    wait_for("engine metrics in the status", lambda: (
        ((llmd.get(cluster.api_client, namespace, "qwen-cpu") or {}).get("status") or {}).get("engine")), 30)
    engine_pod = llmd.owned_pods(cluster.api_client, namespace, "qwen-cpu")[0]
    impostor = client.ApiClient().sanitize_for_serialization(engine_pod)
    impostor["metadata"] = {"name": "impostor", "labels": {SELECTOR_LABEL: "qwen-cpu"}}
    impostor.pop("status", None)
    core(cluster).create_namespaced_pod(namespace, impostor)
    wait_for("the hand-made Pod to run", lambda: (
        core(cluster).read_namespaced_pod("impostor", namespace).status.phase == "Running"), 60)

    deadline = time.monotonic() + 8  # several scrape intervals and settle periods
    while time.monotonic() < deadline:
        status = (llmd.get(cluster.api_client, namespace, "qwen-cpu") or {}).get("status") or {}
        assert status.get("replicas") == 1, status
        assert (status.get("engine") or {}).get("scrapedReplicas", 1) == 1, status
        time.sleep(0.5)


def deployment_uids(cluster: Cluster, namespace: str, name: str) -> set[str]:
    found = read_or_none(apps(cluster).read_namespaced_deployment, name, namespace)
    return {found.metadata.uid} if found is not None else set()


def test_foreground_deletion_recreates_no_child(operator: OperatorProcess, cluster: Cluster, namespace: str) -> None:
    llmd.create(cluster.api_client, namespace, small(llmd.example("cpu-qwen")))
    llmd.wait_phase(cluster.api_client, namespace, "qwen-cpu", "Ready", 90)
    seen = deployment_uids(cluster, namespace, "qwen-cpu")
    llmd.custom(cluster.api_client).delete_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, "qwen-cpu", propagation_policy="Foreground")
    deadline = time.monotonic() + 60
    while llmd.get(cluster.api_client, namespace, "qwen-cpu") is not None:
        assert time.monotonic() < deadline, "the LLMDeployment was not deleted"
        seen |= deployment_uids(cluster, namespace, "qwen-cpu")
        time.sleep(0.1)
    time.sleep(3)
    seen |= deployment_uids(cluster, namespace, "qwen-cpu")
    assert len(seen) == 1, "a Deployment was re-created during the deletion"
    assert children_gone(cluster, namespace, "qwen-cpu")


def test_an_llmdeployment_held_by_a_finalizer_is_not_reconciled(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = small(llmd.example("cpu-qwen"))
    manifest["metadata"]["finalizers"] = ["example.com/hold"]
    llmd.create(cluster.api_client, namespace, manifest)
    llmd.wait_phase(cluster.api_client, namespace, "qwen-cpu", "Ready", 90)
    llmd.delete(cluster.api_client, namespace, "qwen-cpu")
    try:
        apps(cluster).delete_namespaced_deployment("qwen-cpu", namespace)
        wait_for("the Deployment to go", lambda: not deployment_uids(cluster, namespace, "qwen-cpu"), 30)
        time.sleep(5)  # several settle periods: time enough to bring it back
        assert not deployment_uids(cluster, namespace, "qwen-cpu"), "re-created while it is being deleted"
    finally:  # a failed test must not leave a namespace that can never go
        llmd.patch_metadata(cluster.api_client, namespace, "qwen-cpu", {"finalizers": None})


def test_a_quota_that_refuses_the_engine_pods_is_in_the_status(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    core(cluster).create_namespaced_resource_quota(namespace, {
        "metadata": {"name": "no-big-pods"}, "spec": {"hard": {"requests.memory": "1Gi"}}})
    llmd.create(cluster.api_client, namespace, small(llmd.example("cpu-qwen")))
    refused = wait_for("a ReplicaFailure condition", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, "qwen-cpu"))
        and (llmd.condition(obj, "Degraded") or {}).get("reason") == "ReplicaFailure" and obj), 60)
    message = llmd.condition(refused, "Degraded")["message"]
    assert "exceeded quota: no-big-pods" in message, message
    assert refused["status"]["phase"] == "Failed"
    assert llmd.condition(refused, "Ready")["reason"] == "ReplicaFailure"
