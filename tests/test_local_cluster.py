"""The local control plane itself: scheduling onto simulated accelerators, garbage collection,
RBAC with service-account tokens, and the `up` command's idempotence and port checks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devcluster.cluster import PORT_BASE_ENV, REPO_ROOT, STATE_DIR_ENV, ClusterError, LocalCluster, Ports, pod_ranges
from devcluster.pytest_plugin import Cluster, wait_for

pytestmark = pytest.mark.cluster

SIMULATED = {"node-role.vllm-operator.io/simulated": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GAUDI_TOLERATION = {"key": "habana.ai/gaudi", "operator": "Exists", "effect": "NoSchedule"}


def deployment(name: str, *, limits: dict[str, str] | None = None, tolerations: list[dict[str, str]] | None = None,
               replicas: int = 1) -> dict[str, Any]:
    # Pinned to kwok's nodes: without it a pod may land on local-0 and really be started.
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": SIMULATED,
                    "tolerations": tolerations or [],
                    "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10",
                                    "resources": {"limits": limits or {}}}],
                },
            },
        },
    }


def pods_of(core: client.CoreV1Api, namespace: str, app: str) -> list[client.V1Pod]:
    return list(core.list_namespaced_pod(namespace, label_selector=f"app={app}").items)


def ready_pods(core: client.CoreV1Api, apps: client.AppsV1Api, namespace: str, app: str,
               replicas: int = 1) -> list[client.V1Pod]:
    def probe() -> list[client.V1Pod] | None:
        status = apps.read_namespaced_deployment_status(app, namespace).status
        return pods_of(core, namespace, app) if (status.ready_replicas or 0) == replicas else None

    return wait_for(f"deployment {app} to have {replicas} ready replica(s)", probe, 60)


def is_ready(pod: client.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


@pytest.fixture
def core(cluster: Cluster) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.api_client)


@pytest.fixture
def apps(cluster: Cluster) -> client.AppsV1Api:
    return client.AppsV1Api(cluster.api_client)


def test_gpu_deployment_lands_on_an_h100_node_and_becomes_ready(
        core: client.CoreV1Api, apps: client.AppsV1Api, namespace: str) -> None:
    apps.create_namespaced_deployment(namespace, deployment(
        "gpu", limits={"nvidia.com/gpu": "2"}, tolerations=[GPU_TOLERATION]))
    [pod] = ready_pods(core, apps, namespace, "gpu")
    assert pod.spec.node_name.startswith("gpu-h100-")
    assert is_ready(pod) and pod.status.phase == "Running"


def test_gaudi_deployment_lands_on_the_gaudi_node(
        core: client.CoreV1Api, apps: client.AppsV1Api, namespace: str) -> None:
    apps.create_namespaced_deployment(namespace, deployment(
        "gaudi", limits={"habana.ai/gaudi": "1"}, tolerations=[GAUDI_TOLERATION]))
    [pod] = ready_pods(core, apps, namespace, "gaudi")
    assert pod.spec.node_name.startswith("gaudi-")


def test_more_gpus_than_a_node_has_stays_pending(
        core: client.CoreV1Api, apps: client.AppsV1Api, namespace: str) -> None:
    apps.create_namespaced_deployment(namespace, deployment(
        "huge", limits={"nvidia.com/gpu": "9"}, tolerations=[GPU_TOLERATION]))

    def unschedulable() -> client.V1PodCondition | None:
        for pod in pods_of(core, namespace, "huge"):
            for condition in pod.status.conditions or []:
                if condition.type == "PodScheduled" and condition.status == "False":
                    return condition
        return None

    condition = wait_for("the pod to be reported unschedulable", unschedulable, 60)
    assert condition.reason == "Unschedulable"
    assert "nvidia.com/gpu" in condition.message
    [pod] = pods_of(core, namespace, "huge")
    assert pod.status.phase == "Pending" and not pod.spec.node_name


def test_deleting_a_deployment_collects_its_replicaset_and_pods(
        core: client.CoreV1Api, apps: client.AppsV1Api, namespace: str) -> None:
    apps.create_namespaced_deployment(namespace, deployment("web", replicas=2))
    ready_pods(core, apps, namespace, "web", replicas=2)
    assert apps.list_namespaced_replica_set(namespace, label_selector="app=web").items
    apps.delete_namespaced_deployment("web", namespace)
    wait_for("the ReplicaSet to be collected",
             lambda: not apps.list_namespaced_replica_set(namespace, label_selector="app=web").items, 60)
    wait_for("the pods to be collected", lambda: not pods_of(core, namespace, "web"), 60)


def test_service_account_token_is_subject_to_rbac(cluster: Cluster, core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    token = core.create_namespaced_service_account_token(
        "reader", namespace, {"spec": {"audiences": [], "expirationSeconds": 600}}).status.token
    admin = cluster.api_client.configuration
    configuration = client.Configuration()
    configuration.host = admin.host
    configuration.ssl_ca_cert = admin.ssl_ca_cert
    configuration.api_key = {"authorization": token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    with client.ApiClient(configuration) as api:
        as_reader = client.CoreV1Api(api)
        with pytest.raises(ApiException) as denied:
            as_reader.list_namespaced_pod(namespace)
        assert denied.value.status == 403

        rbac = client.RbacAuthorizationV1Api(cluster.api_client)
        rbac.create_namespaced_role(namespace, {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "reader-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})

        def allowed() -> bool:
            try:
                _, status, _ = as_reader.list_namespaced_pod_with_http_info(namespace)
            except ApiException as exc:
                if exc.status != 403:
                    raise
                return False
            return status == 200

        wait_for("the RoleBinding to take effect", allowed, 30)


def run_devcluster(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devcluster", *args], capture_output=True, text=True, timeout=180,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "hack"), **env})


def test_up_again_keeps_the_running_cluster(cluster: Cluster) -> None:
    state_dir = cluster.kubeconfig.parent
    local = LocalCluster(state_dir)
    if not local.is_running():
        pytest.skip(f"KUBECONFIG={cluster.kubeconfig} is not a cluster started by devcluster")
    before = {p.name: p.pid() for p in local.processes()}

    result = run_devcluster("up", env={STATE_DIR_ENV: str(state_dir)})

    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"export KUBECONFIG={cluster.kubeconfig}"
    assert "already running" in result.stdout
    assert {p.name: p.pid() for p in local.processes()} == before


def test_a_busy_port_is_one_clear_error(tmp_path: Path) -> None:
    state_dir = tmp_path / "cluster"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = Ports(port - (Ports().etcd_client - Ports().base))  # etcd's client port, checked first
        assert ports.etcd_client == port

        with pytest.raises(ClusterError) as clash:
            LocalCluster(state_dir, ports).up(out=lambda _line: None)
        cli = run_devcluster("up", env={STATE_DIR_ENV: str(state_dir), PORT_BASE_ENV: str(ports.base)})

    message = str(clash.value)
    assert f"127.0.0.1:{port}" in message and PORT_BASE_ENV in message and "\n" not in message
    assert cli.returncode == 1 and cli.stdout == ""
    assert cli.stderr.strip().splitlines() == [f"error: {message}"]
    assert not list(state_dir.glob("run/*.pid"))


def test_pod_range_is_split_between_kwok_and_the_local_runtime_node() -> None:
    assert pod_ranges("127.64.0.0/16") == ("127.64.0.0/17", "127.64.255.0/24")
    with pytest.raises(ClusterError, match="inside 127.0.0.0/8"):
        pod_ranges("10.244.0.0/16")
    with pytest.raises(ClusterError, match="/22 or larger"):
        pod_ranges("127.64.0.0/24")
