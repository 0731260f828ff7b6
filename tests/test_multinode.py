"""Replicas across nodes: the LeaderWorkerSet the spec renders, its per-rank command lines, the rules on the
split, status.groups, and single-node LLMDeployments rendered exactly as before."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from vllm_operator import api
from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.reconcile.status import Observation, compute_status, replica_groups
from vllm_operator.render import multinode
from vllm_operator.render.engine_args import parallel_sizes
from vllm_operator.render.manifests import Owner, children
from vllm_operator.render.vllm_flags import catalog

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SNAPSHOTS = Path(__file__).resolve().parent / "data" / "rendered"
OWNER = Owner("big", "ai", "uid-1")
SHARED = {"accessMode": "ReadWriteMany"}


def spec(**fields: Any) -> LLMDeploymentSpec:
    body: dict[str, Any] = {"model": {"name": "meta-llama/Llama-3.1-405B-Instruct"},
                            "accelerator": {"type": "nvidia", "count": 8, "nodesPerReplica": 2}, "cache": SHARED}
    body.update(fields)
    return LLMDeploymentSpec.model_validate(body)


def example(name: str) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    return manifest


def group(lws: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(leader, worker) containers of a LeaderWorkerSet."""
    template = lws["spec"]["leaderWorkerTemplate"]
    return template["leaderTemplate"]["spec"]["containers"][0], template["workerTemplate"]["spec"]["containers"][0]


@pytest.mark.parametrize("snapshot", sorted(SNAPSHOTS.glob("*.json")), ids=lambda p: p.stem)
def test_single_node_examples_render_exactly_as_before_multinode(snapshot: Path) -> None:
    """The children of every example that was there before replicas could span nodes, byte for byte."""
    manifest = example(snapshot.stem)
    owner = Owner(manifest["metadata"]["name"], "ns", "uid-1")
    rendered = {f"{kind}/{name}": body for (kind, name), body in
                children(LLMDeploymentSpec.model_validate(manifest["spec"]), owner).items() if body is not None}
    assert json.dumps(rendered, indent=1, sort_keys=True) + "\n" == snapshot.read_text()


def test_405b_on_two_h100_nodes_is_a_leader_worker_set_with_per_rank_arguments() -> None:
    manifest = example("llama31-405b-h100-2nodes")
    owner = Owner(manifest["metadata"]["name"], "ai", "uid-1")
    rendered = children(LLMDeploymentSpec.model_validate(manifest["spec"]), owner)
    assert rendered[("Deployment", owner.name)] is None
    # Not the LLMDeployment's name: the LWS controller names a headless Service after the LWS.
    lws = rendered[("LeaderWorkerSet", f"{owner.name}-lws")]
    assert lws is not None and lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2 and template["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"]["startupPolicy"] == "LeaderCreated" and lws["spec"]["replicas"] == 1
    leader, worker = group(lws)
    common = ["--tensor-parallel-size", "8", "--pipeline-parallel-size", "2", "--distributed-executor-backend", "mp"]
    assert " ".join(common) in " ".join(leader["args"]) and " ".join(common) in " ".join(worker["args"])
    assert leader["args"][-8:] == ["--nnodes", "2", "--node-rank", "0", "--master-addr", "$(LWS_LEADER_ADDRESS)",
                                   "--master-port", "29501"]
    assert leader["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert worker["command"] == ["vllm", "serve"]  # the server module ignores --headless
    assert worker["args"][-9:] == ["--nnodes", "2", "--node-rank", "$(LWS_WORKER_INDEX)", "--master-addr",
                                   "$(LWS_LEADER_ADDRESS)", "--master-port", "29501", "--headless"]
    # Each Pod holds one node's eight GPUs; only the leader serves HTTP, so only it is probed.
    for container in (leader, worker):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
        assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"
        assert env["VLLM_HOST_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert "readinessProbe" in leader and "startupProbe" in leader
    assert not {"readinessProbe", "startupProbe", "livenessProbe", "ports"} & set(worker)
    pods = [template["leaderTemplate"], template["workerTemplate"]]
    assert [p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods] == ["engine", "engine-worker"]
    for pod in pods:
        assert pod["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["spec"]["volumes"]
    service = rendered[("Service", owner.name)]
    assert service is not None and service["spec"]["selector"] == {
        "llm.vllm-operator.io/llmdeployment": owner.name, "leaderworkerset.sigs.k8s.io/worker-index": "0"}


def test_every_flag_of_every_rank_exists_in_vllm() -> None:
    known = catalog().aliases
    for name in ("llama31-405b-h100-2nodes", "llama3-70b-gaudi-2nodes"):
        manifest = example(name)
        lws = children(LLMDeploymentSpec.model_validate(manifest["spec"]), OWNER)[("LeaderWorkerSet", "big-lws")]
        assert lws is not None
        for container in group(lws):
            flags = [a.split("=")[0] for a in container["args"] if a.startswith("--")]
            assert [f for f in flags if f not in known] == [], name


def test_a_name_too_long_for_the_groups_is_refused_across_nodes_only() -> None:
    assert api.name_too_long_across_nodes(spec(), "n" * 44) is None
    assert api.name_too_long_across_nodes(spec(), "n" * 45) == api.NODES_NAME_MESSAGE
    one_node = spec(accelerator={"type": "nvidia", "count": 8})
    assert api.name_too_long_across_nodes(one_node, "n" * 57) is None


def fake_tools(folder: Path, nodes_up: int) -> dict[str, str]:
    """``ray`` that succeeds and ``python3`` that counts ``nodes_up`` Ray nodes or, as the server, prints its
    arguments: enough to run the Ray scripts for real."""
    for name, body in (("ray", "echo ray \"$@\""),
                       ("python3", f'if [ "$1" = -c ]; then echo {nodes_up}; else echo server "$@"; fi')):
        tool = folder / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "LWS_LEADER_ADDRESS": "big-0.big.ai"}


def test_on_gaudi_the_nodes_join_through_ray_and_the_leader_serves_once_all_joined(tmp_path: Path) -> None:
    manifest = example("llama3-70b-gaudi-2nodes")
    lws = children(LLMDeploymentSpec.model_validate(manifest["spec"]), OWNER)[("LeaderWorkerSet", "big-lws")]
    assert lws is not None
    leader, worker = group(lws)
    assert "--distributed-executor-backend" in leader["args"]
    assert leader["args"][leader["args"].index("--distributed-executor-backend") + 1] == "ray"
    assert worker["args"] == [] and "--nnodes" not in leader["args"]
    env = {e["name"]: e.get("value") for e in leader["env"]}
    assert env["HCCL_SOCKET_IFNAME"] == "eth0" and env["PT_HPU_ENABLE_LAZY_COLLECTIVES"] == "true"
    ran = subprocess.run([*leader["command"], *leader["args"]], env=fake_tools(tmp_path, 2), capture_output=True,
                         text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[0].startswith("ray start --head --port=6379")
    assert ran.stdout.splitlines()[-1] == "server -m vllm.entrypoints.openai.api_server " + " ".join(leader["args"])
    joined = subprocess.run(worker["command"], env=fake_tools(tmp_path, 2), capture_output=True, text=True, timeout=30)
    assert joined.stdout.strip() == "ray start --address=big-0.big.ai:6379 --block --disable-usage-stats"


def test_the_default_split_is_tensor_inside_a_node_and_pipeline_across() -> None:
    assert parallel_sizes(spec()) == (8, 2)
    assert parallel_sizes(spec(engine={"pipelineParallelSize": 4})) == (4, 4)
    assert parallel_sizes(spec(engine={"tensorParallelSize": 16})) == (16, 1)
    cpu = spec(accelerator={"type": "cpu", "nodesPerReplica": 2})
    assert parallel_sizes(cpu) == (1, 2)


@pytest.mark.parametrize(("fields", "message"), [
    ({"engine": {"tensorParallelSize": 8}}, "tensorParallelSize = accelerator.count, pipelineParallelSize = "
                                            "accelerator.nodesPerReplica"),
    ({"engine": {"pipelineParallelSize": 3}}, "must be a multiple of engine.pipelineParallelSize"),
    ({"cache": {}}, "replicas that span nodes"),
    ({"accelerator": {"type": "cpu", "nodesPerReplica": 2}, "engine": {"tensorParallelSize": 3}},
     "must be a multiple of accelerator.nodesPerReplica"),
    ({"accelerator": {"type": "cpu", "nodesPerReplica": 2}, "engine": {"backend": "openvino"}},
     "accelerator.nodesPerReplica"),
])
def test_a_split_that_does_not_add_up_is_refused_with_the_usual_one(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        spec(**fields)
    assert message in str(refused.value)


def member(name: str, group_index: int, rank: int, ready: bool = True, node: str | None = "gpu-h100-0",
           **status: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": name, "labels": {multinode.GROUP_INDEX_LABEL: str(group_index),
                                              multinode.WORKER_INDEX_LABEL: str(rank),
                                              multinode.NAME_LABEL: "big"},
                     "ownerReferences": [{"kind": "StatefulSet", "controller": True, "uid": "s"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                   "containerStatuses": [{"name": "vllm", "ready": ready, "started": ready}], **status},
    }
    if node:
        pod["spec"] = {"nodeName": node}
    return pod


def test_a_group_is_ready_with_its_leader_ready_and_every_worker_running() -> None:
    leader, worker = member("big-0", 0, 0), member("big-0-1", 0, 1, node="gpu-h100-1")
    assert multinode.member_of(leader, "big") is True and multinode.member_of(worker, "big") is False
    assert multinode.member_of(leader, "other") is None
    odd = member("big-0-x", 0, 1)
    odd["metadata"]["labels"][multinode.WORKER_INDEX_LABEL] = "x"  # not the webhook's: no member, no crash
    assert multinode.member_of(odd, "big") is None
    [ready] = replica_groups([leader], [worker], 2)
    assert ready == {"index": 0, "ready": True, "workersReady": "1/1", "members": [
        {"pod": "big-0", "role": "leader", "rank": 0, "node": "gpu-h100-0", "state": "Ready"},
        {"pod": "big-0-1", "role": "worker", "rank": 1, "node": "gpu-h100-1", "state": "Ready"}]}
    api.ReplicaGroup.model_validate(ready)


def test_status_names_the_member_that_holds_its_group_back() -> None:
    unschedulable = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/7 nodes are available: 7 Insufficient nvidia.com/gpu."}], "containerStatuses": []}
    pods = [member("big-0", 0, 0, ready=False), member("big-1", 1, 0)]
    workers = [member("big-0-1", 0, 1, node=None, **unschedulable), member("big-1-1", 1, 1, node="gpu-h100-1")]
    observation = Observation("big", "ai", 1, 2, pods=pods, workers=workers, group_size=2,
                              workload={"kind": "LeaderWorkerSet", "status": {"replicas": 2, "updatedReplicas": 2}})
    status = compute_status(observation, {}, "2026-12-02T00:00:00Z")
    assert status["phase"] == "Degraded" and status["ready"] == "1/2" and status["replicas"] == 2
    held = status["groups"][0]
    assert not held["ready"] and held["workersReady"] == "0/1"
    assert held["message"] == ("worker big-0-1 (rank 1) is Unschedulable: 0/7 nodes are available: 7 Insufficient "
                               "nvidia.com/gpu.")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert "group 0: worker big-0-1 (rank 1) is Unschedulable" in ready["message"]
    assert next(c for c in status["conditions"] if c["type"] == "Unschedulable")["status"] == "True"
    api.LLMDeploymentStatus.model_validate(status)


def test_a_crashed_worker_is_named_with_its_node_and_the_engines_words() -> None:
    crashed = {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}], "containerStatuses": [
        {"name": "vllm", "ready": False, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
         "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "NCCL error: unhandled system error"}}}]}
    [held] = replica_groups([member("big-0", 0, 0, ready=False)], [member("big-0-1", 0, 1, node="gpu-h100-1", **crashed)], 2)
    assert held["members"][1]["state"] == "Failed"
    assert held["message"].startswith("worker big-0-1 (rank 1 on node gpu-h100-1) is Failed: pod big-0-1: exit code 1")
    assert "NCCL error" in held["message"]


def test_a_leader_waiting_for_its_workers_says_so() -> None:
    [waiting] = replica_groups([member("big-0", 0, 0, ready=False)], [member("big-0-1", 0, 1)], 2)
    assert waiting["message"] == ("leader big-0 is Running: the engine is loading, or waits for its workers to join")
    [missing] = replica_groups([member("big-0", 0, 0, ready=False)], [], 3)
    assert missing["message"] == "0 of its 2 worker Pods exist"
