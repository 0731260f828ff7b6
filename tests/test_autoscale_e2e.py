"""The built-in autoscaler on the local cluster: simulated engines report the load each test sets,
the operator scrapes it, decides, and writes spec.replicas through the scale subresource."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from kubernetes import client

import llmd
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from devcluster.simengines import admin_url
from test_reconcile_e2e import apps, core, small
from vllm_operator import api
from vllm_operator.render.manifests import cache_claim_name

pytestmark = pytest.mark.cluster

NAME = "qwen-cpu"
IDLE = {"vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0, "vllm:kv_cache_usage_perc": 0.0}


def autoscaled(**autoscaling: Any) -> dict[str, Any]:
    manifest = small(llmd.example("cpu-qwen"))
    manifest["spec"]["cache"]["accessMode"] = "ReadWriteMany"
    manifest["spec"]["autoscaling"] = autoscaling
    return manifest


def set_loads(cluster: Cluster, namespace: str, first: dict[str, float]) -> int:
    """The oldest engine reports ``first``, every other one idles; returns how many engines there are.

    Called again while waiting, so that replicas the autoscaler adds report idle too."""
    pods = sorted(llmd.owned_pods(cluster.api_client, namespace, NAME), key=lambda p: p.metadata.creation_timestamp)
    for index, pod in enumerate(pods):
        if pod.status.pod_ip:
            request = urllib.request.Request(
                f"{admin_url(cluster.kubeconfig)}/engines/{pod.status.pod_ip}/load", method="PUT",
                data=json.dumps(first if index == 0 else IDLE).encode(), headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=5).close()
    return len(pods)


def replicas(cluster: Cluster, namespace: str) -> int:
    return int((llmd.get(cluster.api_client, namespace, NAME) or {})["spec"].get("replicas", 1))


def test_a_queue_building_up_adds_replicas(operator: OperatorProcess, cluster: Cluster, namespace: str) -> None:
    llmd.create(cluster.api_client, namespace, autoscaled(
        minReplicas=1, maxReplicas=4, targets=[{"metric": "waitingRequests", "value": 10}]))
    llmd.wait_phase(cluster.api_client, namespace, NAME, "Ready", 90)
    set_loads(cluster, namespace, IDLE)

    busy = {**IDLE, "vllm:num_requests_waiting": 40}
    wait_for("4 replicas for 40 waiting requests at 10 each", lambda: (
        set_loads(cluster, namespace, busy) and replicas(cluster, namespace) == 4), 120, 1)
    obj = llmd.get(cluster.api_client, namespace, NAME)
    # The status follows the scale-up's steps (1 -> 2 -> 4, or through 3) a write behind.
    scaling = wait_for("status.autoscaling of the last step", lambda: (
        (o := llmd.get(cluster.api_client, namespace, NAME)) and (o["status"].get("autoscaling") or {}).get(
            "lastScaleTime") and o["status"]["autoscaling"]["desiredReplicas"] == 4 and o), 30)["status"]["autoscaling"]
    assert scaling["desiredReplicas"] == 4, scaling
    assert "waitingRequests" in scaling["reason"], scaling
    assert obj is not None and apps(cluster).read_namespaced_deployment(NAME, namespace).spec.replicas == 4
    llmd.events_once(cluster.api_client, namespace, NAME, lambda events: any(e.reason == "Scaled" for e in events))


def test_a_count_outside_the_bounds_moves_to_them_before_any_engine_exists(
        operator: OperatorProcess, cluster: Cluster, namespace: str) -> None:
    # Created at zero: no engine ever reports, and the autoscaler decides on the bounds alone.
    manifest = autoscaled(minReplicas=1, maxReplicas=2, targets=[{"metric": "waitingRequests", "value": 10}])
    manifest["spec"]["replicas"] = 0
    llmd.create(cluster.api_client, namespace, manifest)
    wait_for("minReplicas 1", lambda: replicas(cluster, namespace) == 1, 30)
    llmd.wait_phase(cluster.api_client, namespace, NAME, "Ready", 90)


def test_kubectl_scale_is_overruled_with_an_event(operator: OperatorProcess, cluster: Cluster, namespace: str) -> None:
    # On the queue only: a new simulated engine reports requests running until the test sets its load.
    llmd.create(cluster.api_client, namespace, autoscaled(
        minReplicas=1, maxReplicas=3, targets=[{"metric": "waitingRequests", "value": 10}],
        behavior={"scaleDownStabilizationSeconds": 0, "scaleDownDelaySeconds": 0}))
    llmd.wait_phase(cluster.api_client, namespace, NAME, "Ready", 90)
    set_loads(cluster, namespace, IDLE)
    llmd.custom(cluster.api_client).patch_namespaced_custom_object_scale(
        api.GROUP, api.VERSION, namespace, api.PLURAL, NAME, {"spec": {"replicas": 3}})

    def overruled() -> list[client.CoreV1Event]:
        set_loads(cluster, namespace, IDLE)
        events = core(cluster).list_namespaced_event(namespace, field_selector=f"involvedObject.name={NAME}").items
        return [e for e in events if e.reason == "ScaleOverruled"]

    event = wait_for("a ScaleOverruled Event", overruled, 90, 1)[0]
    assert "set outside spec.autoscaling" in event.message
    wait_for("back to 1 replica", lambda: set_loads(cluster, namespace, IDLE) and replicas(cluster, namespace) == 1,
             90, 1)


def test_an_idle_model_scales_to_zero_and_keeps_its_cache(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    llmd.create(cluster.api_client, namespace, autoscaled(
        minReplicas=0, maxReplicas=2, behavior={"scaleToZeroAfterSeconds": 10, "scaleDownStabilizationSeconds": 0,
                                                "scaleDownDelaySeconds": 0}))
    llmd.wait_phase(cluster.api_client, namespace, NAME, "Ready", 90)
    set_loads(cluster, namespace, IDLE)
    idle = llmd.wait_phase(cluster.api_client, namespace, NAME, "Idle", 120)
    assert idle["spec"]["replicas"] == 0
    assert llmd.condition(idle, "Ready")["reason"] == "ScaledToZero"
    wait_for("the engine Pods to go", lambda: not llmd.owned_pods(cluster.api_client, namespace, NAME), 60)
    assert core(cluster).read_namespaced_persistent_volume_claim(cache_claim_name(NAME), namespace)
    assert core(cluster).read_namespaced_service(NAME, namespace), "the endpoint stays resolvable"

    # kubectl scale wakes it: nothing serves at zero, so there is no load to overrule the count with.
    llmd.custom(cluster.api_client).patch_namespaced_custom_object_scale(
        api.GROUP, api.VERSION, namespace, api.PLURAL, NAME, {"spec": {"replicas": 1}})
    woken = llmd.wait_phase(cluster.api_client, namespace, NAME, "Ready", 60)
    assert woken["spec"]["replicas"] == 1
    set_loads(cluster, namespace, IDLE)
    llmd.wait_phase(cluster.api_client, namespace, NAME, "Idle", 120)
    reasons = [e.reason for e in llmd.events_once(cluster.api_client, namespace, NAME,
                                                  lambda events: any(e.reason == "Scaled" for e in events))]
    assert "ScaleOverruled" not in reasons and reasons.count("Scaled") >= 1, reasons


def test_an_hpa_on_the_same_llmdeployment_makes_the_autoscaler_stand_aside(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    llmd.create(cluster.api_client, namespace, autoscaled(
        minReplicas=1, maxReplicas=4, targets=[{"metric": "waitingRequests", "value": 10}]))
    llmd.wait_phase(cluster.api_client, namespace, NAME, "Ready", 90)
    client.AutoscalingV2Api(cluster.api_client).create_namespaced_horizontal_pod_autoscaler(namespace, {
        "metadata": {"name": "theirs"},
        "spec": {"scaleTargetRef": {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "name": NAME},
                 "minReplicas": 1, "maxReplicas": 2,
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                     "type": "Utilization", "averageUtilization": 80}}}]}})
    busy = {**IDLE, "vllm:num_requests_waiting": 40}
    conflicted = wait_for("the AutoscalerConflict condition", lambda: (
        set_loads(cluster, namespace, busy)
        and (obj := llmd.get(cluster.api_client, namespace, NAME))
        and (llmd.condition(obj, "Degraded") or {}).get("reason") == "AutoscalerConflict" and obj), 60, 1)
    assert "HorizontalPodAutoscaler theirs" in llmd.condition(conflicted, "Degraded")["message"]
    assert replicas(cluster, namespace) == 1, "the built-in autoscaler wrote replicas despite the HPA"
