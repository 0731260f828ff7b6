"""The real LeaderWorkerSet controller on the local cluster: a group of a leader and a worker on kwok's simulated
GPU nodes, the Pod webhook's labels and environment, status, and the validating webhook's refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devcluster.nodes import H100_PRODUCT
from devcluster.pytest_plugin import Cluster, wait_for

pytestmark = pytest.mark.cluster

GROUP = "leaderworkerset.x-k8s.io"
VERSION = "v1"
PLURAL = "leaderworkersets"
NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
TIMEOUT = (5, 30)


def leaderworkerset(name: str, *, size: int, replicas: int = 1) -> dict[str, Any]:
    # Pinned to kwok's H100 nodes: a pod on local-0 would really be started.
    pod_spec = {
        "nodeSelector": {"nvidia.com/gpu.product": H100_PRODUCT},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{"name": "main", "image": "busybox:1.36", "command": ["sleep", "infinity"],
                        "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": name},
        "spec": {"replicas": replicas,
                 "leaderWorkerTemplate": {"size": size, "workerTemplate": {"spec": pod_spec}}},
    }


def _lws(custom: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _request_timeout=TIMEOUT)


def _pods(core: client.CoreV1Api, namespace: str, name: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"{NAME_LABEL}={name}", _request_timeout=TIMEOUT).items


def _env(pod: client.V1Pod) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env or []}


def test_group_runs_on_simulated_gpus(cluster: Cluster, namespace: str) -> None:
    custom = client.CustomObjectsApi(cluster.api_client)
    core = client.CoreV1Api(cluster.api_client)
    apps = client.AppsV1Api(cluster.api_client)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, leaderworkerset("group", size=2),
                                           _request_timeout=TIMEOUT)

    def explain() -> str:
        pods = [(p.metadata.name, p.status.phase, p.spec.node_name) for p in _pods(core, namespace, "group")]
        return f"pods: {pods}; status: {_lws(custom, namespace, 'group').get('status')}"

    # The leader StatefulSet has the LWS's name; each group's workers one named after their leader.
    wait_for("leader StatefulSet group", lambda: _exists(lambda: apps.read_namespaced_stateful_set(
        "group", namespace, _request_timeout=TIMEOUT)), 60, explain=explain)
    wait_for("worker StatefulSet group-0", lambda: _exists(lambda: apps.read_namespaced_stateful_set(
        "group-0", namespace, _request_timeout=TIMEOUT)), 60, explain=explain)

    def running() -> list[client.V1Pod] | None:
        pods = _pods(core, namespace, "group")
        return pods if len(pods) == 2 and all(p.status.phase == "Running" for p in pods) else None

    pods = {p.metadata.labels[WORKER_INDEX_LABEL]: p for p in wait_for("2 Running pods", running, 90,
                                                                         explain=explain)}
    assert set(pods) == {"0", "1"}
    leader, worker = pods["0"], pods["1"]
    assert (leader.metadata.name, worker.metadata.name) == ("group-0", "group-0-1")
    for pod in (leader, worker):
        node = core.read_node(pod.spec.node_name, _request_timeout=TIMEOUT)
        assert node.metadata.labels.get("nvidia.com/gpu.product") == H100_PRODUCT, pod.spec.node_name
    # Injected by the Pod webhook: the leader's stable DNS name through the group's headless Service.
    env = _env(worker)
    assert env["LWS_LEADER_ADDRESS"] == f"group-0.group.{namespace}"
    assert env["LWS_GROUP_SIZE"] == "2"
    assert env["LWS_WORKER_INDEX"] == "1"
    assert _env(leader)["LWS_WORKER_INDEX"] == "0"

    def available() -> dict[str, Any] | None:
        status = _lws(custom, namespace, "group").get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        return status if conditions.get("Available") == "True" and status.get("readyReplicas") == 1 else None

    status = wait_for("LeaderWorkerSet Available with 1 ready replica", available, 90, explain=explain)
    assert status["replicas"] == 1


def test_invalid_size_is_refused_by_the_webhook(cluster: Cluster, namespace: str) -> None:
    custom = client.CustomObjectsApi(cluster.api_client)
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, leaderworkerset("bad", size=0),
                                               _request_timeout=TIMEOUT)
    assert refused.value.status == 403, refused.value.body  # a webhook denial
    # The validating webhook's own words (the CRD's schema allows 0).
    message = json.loads(refused.value.body)["message"]
    assert message.startswith('admission webhook "vleaderworkerset.kb.io" denied the request'), message
    assert "spec.leaderWorkerTemplate.size: Invalid value: 0: size must be equal or greater than 1" in message


def test_ordinary_pods_skip_the_pod_webhook(cluster: Cluster) -> None:
    # Upstream scopes the Pod webhooks to pods with the LWS name label, so every other Pod is admitted without it.
    admission = client.AdmissionregistrationV1Api(cluster.api_client)
    for configuration in (admission.read_mutating_webhook_configuration("lws-mutating-webhook-configuration"),
                          admission.read_validating_webhook_configuration("lws-validating-webhook-configuration")):
        for webhook in configuration.webhooks:
            assert webhook.client_config.url.startswith("https://127.0.0.1:"), webhook.name
            assert webhook.failure_policy == "Fail"
            if "pod" in webhook.name:
                [expression] = webhook.object_selector.match_expressions
                assert (expression.key, expression.operator) == (NAME_LABEL, "Exists")


def _exists(read: Any) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status != 404:
            raise
        return False
    return True
