"""Replicas across nodes on the local cluster, with the real LeaderWorkerSet controller: the examples' groups land
on two nodes each with every rank's arguments, a lost worker restarts its group while the status names it, and
moving between one node and two replaces the Deployment with a LeaderWorkerSet and back, leaking neither."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes import client

import llmd
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from test_reconcile_e2e import apps, read_or_none, small
from test_trust_e2e import replace_spec

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]
LWS = ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets")
GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"


def leader_worker_set(cluster: Cluster, namespace: str, name: str) -> Obj | None:
    """The LeaderWorkerSet of LLMDeployment ``name``."""
    return read_or_none(client.CustomObjectsApi(cluster.api_client).get_namespaced_custom_object,
                        *LWS[:2], namespace, LWS[2], f"{name}-lws")


def group_pods(cluster: Cluster, namespace: str, name: str) -> list[client.V1Pod]:
    """The Pods of the LLMDeployment's groups that are not going away, by group and rank."""
    pods = client.CoreV1Api(cluster.api_client).list_namespaced_pod(
        namespace, label_selector=f"leaderworkerset.sigs.k8s.io/name={name}-lws").items
    live = [p for p in pods if p.metadata.deletion_timestamp is None]
    return sorted(live, key=lambda p: (p.metadata.labels.get(GROUP_INDEX), p.metadata.labels.get(WORKER_INDEX)))


def env_of(pod: client.V1Pod) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env or [] if e.value is not None}


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """The arguments as the kubelet runs them: $(VAR) from the container's environment."""
    out = []
    for arg in args:
        for key, value in env.items():
            arg = arg.replace(f"$({key})", value)
        out.append(arg)
    return out


@pytest.mark.parametrize(("example", "node_prefix", "rank_flags"), [
    ("llama31-405b-h100-2nodes", "gpu-h100-", True),
    ("llama3-70b-gaudi-2nodes", "gaudi-", False),
])
def test_a_replica_across_two_nodes_is_a_group_on_two_nodes(
    operator: OperatorProcess, cluster: Cluster, namespace: str, example: str, node_prefix: str, rank_flags: bool
) -> None:
    manifest = small(llmd.example(example))
    name = manifest["metadata"]["name"]
    llmd.create(cluster.api_client, namespace, manifest)
    ready = llmd.wait_phase(cluster.api_client, namespace, name, "Ready", 90)

    lws = leader_worker_set(cluster, namespace, name)
    assert lws is not None and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert read_or_none(apps(cluster).read_namespaced_deployment, name, namespace) is None
    leader, worker = group_pods(cluster, namespace, name)
    assert leader.spec.node_name.startswith(node_prefix) and worker.spec.node_name.startswith(node_prefix)
    assert leader.spec.node_name != worker.spec.node_name  # eight devices each: a node apiece
    # The LWS controller's Pod webhook told each Pod its rank and the leader's address.
    leader_env, worker_env = env_of(leader), env_of(worker)
    address = f"{name}-lws-0.{name}-lws.{namespace}"  # the LWS controller's headless Service, not ours
    assert worker_env["LWS_LEADER_ADDRESS"] == leader_env["LWS_LEADER_ADDRESS"] == address
    assert (leader_env["LWS_WORKER_INDEX"], worker_env["LWS_WORKER_INDEX"]) == ("0", "1")
    if rank_flags:
        leader_args = expand(leader.spec.containers[0].args, leader_env)
        worker_args = expand(worker.spec.containers[0].args, worker_env)
        assert leader_args[-8:] == ["--nnodes", "2", "--node-rank", "0", "--master-addr",
                                    address, "--master-port", "29501"]
        assert worker_args[-9:-1] == ["--nnodes", "2", "--node-rank", "1", "--master-addr",
                                      address, "--master-port", "29501"]
        assert worker_args[-1] == "--headless"
    status = ready["status"]
    assert status["ready"] == "1/1" and status["replicas"] == 1
    [group] = status["groups"]
    assert group["ready"] and group["workersReady"] == "1/1"
    assert [(m["pod"], m["role"], m["node"]) for m in group["members"]] == [
        (leader.metadata.name, "leader", leader.spec.node_name), (worker.metadata.name, "worker", worker.spec.node_name)]
    # Only the leader serves: the Service selects it, the scale subresource counts leaders.
    # (The local cluster runs no endpoints controller: loopback Pod IPs are no endpoints. The selector decides.)
    core = client.CoreV1Api(cluster.api_client)
    service = core.read_namespaced_service(name, namespace)
    assert service.metadata.owner_references[0].kind == "LLMDeployment" and service.spec.cluster_ip != "None"
    headless = core.read_namespaced_service(f"{name}-lws", namespace)
    assert headless.spec.cluster_ip == "None" and headless.metadata.owner_references[0].kind == "LeaderWorkerSet"
    selector = service.spec.selector
    assert selector.items() <= leader.metadata.labels.items() and not selector.items() <= worker.metadata.labels.items()
    assert status["selector"].endswith(f"{WORKER_INDEX}=0")
    scraped = wait_for("engine metrics from the leader", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, name)) and "engine" in obj["status"] and obj), 30)
    assert scraped["status"]["engine"]["scrapedReplicas"] == 1


def test_a_lost_worker_restarts_its_group_and_the_status_names_it(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = small(llmd.example("llama31-405b-h100-2nodes"))
    name = manifest["metadata"]["name"]
    llmd.create(cluster.api_client, namespace, manifest)
    llmd.wait_phase(cluster.api_client, namespace, name, "Ready", 90)
    leader, worker = group_pods(cluster, namespace, name)

    # Cordon every other H100 node, so that the group's new Pods cannot all be placed and the status must say which.
    core = client.CoreV1Api(cluster.api_client)
    others = [n.metadata.name for n in core.list_node(label_selector="nvidia.com/gpu.product").items
              if n.metadata.name != leader.spec.node_name]
    try:
        for node in others:
            core.patch_node(node, {"spec": {"unschedulable": True}})
        # Gracefully, as an eviction or a drain does: the LWS controller sees it going (deletionTimestamp) and restarts
        # the group. (Deleted at once, the Pod is simply gone, and its StatefulSet makes it again.)
        core.delete_namespaced_pod(worker.metadata.name, namespace)
        held = wait_for("the status to name the member that cannot be placed", lambda: (
            (obj := llmd.get(cluster.api_client, namespace, name))
            and any(g.get("message") and "Unschedulable" in g["message"] for g in obj["status"].get("groups") or [])
            and obj), 60)
        assert held["status"]["phase"] != "Ready"
        [group] = held["status"]["groups"]
        assert not group["ready"]
        stuck = next(m for m in group["members"] if m["state"] == "Unschedulable")
        assert group["message"].startswith(f"{stuck['role']} {stuck['pod']} (rank {stuck['rank']}) is Unschedulable")
        ready = llmd.condition(held, "Ready")
        assert ready is not None and f"group 0: {stuck['role']} {stuck['pod']}" in ready["message"]
    finally:
        for node in others:
            core.patch_node(node, {"spec": {"unschedulable": False}})
    llmd.wait_phase(cluster.api_client, namespace, name, "Ready", 90)
    new_leader, _ = group_pods(cluster, namespace, name)
    # RecreateGroupOnPodRestart: the group came back as a whole, leader included.
    assert new_leader.metadata.uid != leader.metadata.uid


def test_moving_between_one_node_and_two_replaces_the_workload_and_leaks_nothing(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = small(llmd.example("llama31-405b-h100-2nodes"))
    name = manifest["metadata"]["name"]
    one_node = {"accelerator": {"type": "nvidia", "count": 8, "product": manifest["spec"]["accelerator"]["product"]},
                "engine": {"tensorParallelSize": 8, "pipelineParallelSize": 1}}
    llmd.create(cluster.api_client, namespace, {**manifest, "spec": {**manifest["spec"], **one_node}})
    llmd.wait_phase(cluster.api_client, namespace, name, "Ready", 90)
    deployment = apps(cluster).read_namespaced_deployment(name, namespace)

    llmd.patch_spec(cluster.api_client, namespace, name, {
        "accelerator": {"nodesPerReplica": 2}, "engine": {"pipelineParallelSize": 2}})
    ready = llmd.wait_phase(cluster.api_client, namespace, name, "Ready", 90)
    assert ready["status"]["groups"][0]["ready"]
    assert leader_worker_set(cluster, namespace, name) is not None
    wait_for("the Deployment to go", lambda: read_or_none(
        apps(cluster).read_namespaced_deployment, name, namespace) is None, 30)
    wait_for("its Pods to go", lambda: not [p for p in llmd.owned_pods(cluster.api_client, namespace, name)
                                            if p.metadata.owner_references[0].kind == "ReplicaSet"], 30)

    llmd.patch_spec(cluster.api_client, namespace, name, {
        "accelerator": {"nodesPerReplica": None}, "engine": {"pipelineParallelSize": None}})
    ready = llmd.wait_phase(cluster.api_client, namespace, name, "Ready", 90)
    assert "groups" not in ready["status"]
    wait_for("the LeaderWorkerSet to go", lambda: leader_worker_set(cluster, namespace, name) is None, 30)
    wait_for("its groups' Pods to go", lambda: group_pods(cluster, namespace, name) == [], 30)
    again = apps(cluster).read_namespaced_deployment(name, namespace)
    assert again.metadata.uid != deployment.metadata.uid
    assert again.spec.template.spec.containers[0].args == deployment.spec.template.spec.containers[0].args


def test_a_leader_worker_set_of_the_same_name_that_is_not_ours_is_left_alone(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = small(llmd.example("llama31-405b-h100-2nodes"))
    name = manifest["metadata"]["name"]
    custom = client.CustomObjectsApi(cluster.api_client)
    pod = {"metadata": {}, "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}],
                                    "nodeSelector": {"no-such-node": "true"}}}
    foreign = custom.create_namespaced_custom_object(*LWS[:2], namespace, LWS[2], {
        "apiVersion": "/".join(LWS[:2]), "kind": "LeaderWorkerSet",
        "metadata": {"name": f"{name}-lws"},
        "spec": {"replicas": 1, "leaderWorkerTemplate": {"size": 2, "workerTemplate": pod}}})

    llmd.create(cluster.api_client, namespace, manifest)
    conflicted = wait_for("the ChildConflict condition", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, name))
        and (llmd.condition(obj, "Degraded") or {}).get("reason") == "ChildConflict" and obj), 30)
    assert f"LeaderWorkerSet {name}-lws already exists" in llmd.condition(conflicted, "Degraded")["message"]
    after = leader_worker_set(cluster, namespace, name)
    assert after is not None and after["metadata"]["uid"] == foreign["metadata"]["uid"]
    assert {m["manager"] for m in after["metadata"].get("managedFields") or []}.isdisjoint({"vllm-operator"})
    assert not after["metadata"].get("ownerReferences")


def test_a_field_removed_from_the_spec_leaves_every_rank(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = small(llmd.example("llama31-405b-h100-2nodes"))
    name = manifest["metadata"]["name"]
    llmd.create(cluster.api_client, namespace, manifest)
    wait_for("the LeaderWorkerSet with --max-model-len", lambda: (
        (lws := leader_worker_set(cluster, namespace, name))
        and "--max-model-len" in lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["args"]),
        30)
    spec = copy.deepcopy(manifest["spec"])
    del spec["engine"]["maxModelLen"]
    replace_spec(cluster, namespace, name, spec)

    def args() -> list[list[str]]:
        lws = leader_worker_set(cluster, namespace, name) or {}
        template = lws.get("spec", {}).get("leaderWorkerTemplate", {})
        return [template[t]["spec"]["containers"][0]["args"] for t in ("leaderTemplate", "workerTemplate")]

    wait_for("--max-model-len to leave the leader's and the worker's arguments",
             lambda: all("--max-model-len" not in a for a in args()), 30)
