"""A replica across nodes (``accelerator.nodesPerReplica`` > 1): the command lines and environment of the Pods
of a LeaderWorkerSet group (``manifests.leader_worker_set`` builds the object around them).

Each replica is one LWS group of N Pods, one per node: the leader (node rank 0) runs the OpenAI server, the
N-1 workers run the rest of the ranks headless. The LWS controller creates and restarts the group as one
(``RecreateGroupOnPodRestart``: a lost worker restarts its group, as vLLM cannot take a rank back) and gives
every Pod the leader's address and its own index, which the command lines below read from the environment.

With ``mp`` (vLLM's own multi-node) every Pod gets ``--nnodes``, ``--node-rank`` and ``--master-addr``: the
leader runs the server module as on one node, the workers ``vllm serve --headless``. With ``ray`` the leader
starts a Ray head, waits until every node joined, then runs the server with ``--distributed-executor-backend
ray``; the workers join the head.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.render.engine_args import ENGINE_COMMAND, distributed_backend
from vllm_operator.render.profiles import profile_for

Manifest = dict[str, Any]

API_VERSION = "leaderworkerset.x-k8s.io/v1"
KIND = "LeaderWorkerSet"
# Labels and environment the LWS controller's Pod webhook puts on every Pod of a group.
NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
LEADER_ADDRESS_ENV = "LWS_LEADER_ADDRESS"
WORKER_INDEX_ENV = "LWS_WORKER_INDEX"
# torch.distributed's rendezvous on the leader (vLLM's --master-port default), and the Ray head's port.
MASTER_PORT = 29501
RAY_PORT = 6379
HEADLESS_COMMAND = ("vllm", "serve")
# How long a Ray leader waits for its workers to join before it gives up (and the group restarts).
RAY_JOIN_SECONDS = 600


def lws_name(owner_name: str) -> str:
    """The LeaderWorkerSet of LLMDeployment ``owner_name``. Not its own name: the LWS controller gives the group's
    Pods DNS names through a headless Service named like the LWS, and that name is the LLMDeployment's Service."""
    return f"{owner_name}-lws"


def member_of(pod: Mapping[str, Any], name: str) -> bool | None:
    """True for the leader of a group of LeaderWorkerSet ``name``, False for a worker, None for neither."""
    labels = pod["metadata"].get("labels") or {}
    controller = next((r for r in pod["metadata"].get("ownerReferences") or [] if r.get("controller")), {})
    indices = (labels.get(GROUP_INDEX_LABEL, ""), labels.get(WORKER_INDEX_LABEL, ""))
    if labels.get(NAME_LABEL) != name or controller.get("kind") != "StatefulSet" or not all(i.isdigit() for i in indices):
        return None
    return labels.get(WORKER_INDEX_LABEL) == "0"


def _pod_ip_env() -> dict[str, Any]:
    # vLLM and Ray advertise this address to the other ranks: the Pod's own, not whatever the host resolves.
    return {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def _env(spec: LLMDeploymentSpec, base: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The engine's environment plus the profile's network settings; spec.engine.env still wins."""
    own = {var.name for var in spec.engine.env}
    extra = [{"name": k, "value": v} for k, v in profile_for(spec.accelerator.type).multinode_env.items()
             if k not in own]
    if "VLLM_HOST_IP" not in own:
        extra.append(_pod_ip_env())
    names = {e["name"] for e in extra}
    return [e for e in base if e["name"] not in names] + extra


def _mp_args(spec: LLMDeploymentSpec, rank: str) -> list[str]:
    return ["--nnodes", str(spec.accelerator.nodes), "--node-rank", rank, "--master-addr", f"$({LEADER_ADDRESS_ENV})",
            "--master-port", str(MASTER_PORT)]


def _ray_leader_script(spec: LLMDeploymentSpec) -> str:
    """Start the head, wait until all N nodes joined, then become the server (its arguments follow "$@")."""
    wanted = spec.accelerator.nodes
    count = 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))'
    server = " ".join(shlex.quote(part) for part in ENGINE_COMMAND)
    return (
        f"ray start --head --port={RAY_PORT} --disable-usage-stats && "
        f"for i in $(seq {RAY_JOIN_SECONDS // 5}); do "
        f"[ \"$(python3 -c {shlex.quote(count)} 2>/dev/null)\" -ge {wanted} ] && exec {server} \"$@\"; sleep 5; done; "
        f"echo 'the Ray cluster did not reach {wanted} nodes within {RAY_JOIN_SECONDS}s' >&2; exit 1"
    )


def _ray_worker_script() -> str:
    return (f"until ray start --address=${LEADER_ADDRESS_ENV}:{RAY_PORT} --block --disable-usage-stats; "
            "do sleep 5; done")


def group_containers(spec: LLMDeploymentSpec, engine: Manifest) -> tuple[Manifest, Manifest]:
    """(leader, worker) containers of a group, from the single-node engine container ``engine``."""
    leader = {**engine, "env": _env(spec, engine["env"])}
    worker = {k: v for k, v in leader.items() if k not in ("startupProbe", "readinessProbe", "livenessProbe", "ports")}
    if distributed_backend(spec) == "ray":
        leader["command"] = ["/bin/sh", "-c", _ray_leader_script(spec), "vllm-leader"]
        worker["command"] = ["/bin/sh", "-c", _ray_worker_script()]
        worker["args"] = []
    else:
        leader["args"] = engine["args"] + _mp_args(spec, "0")
        # A headless worker serves no HTTP: nothing to probe; the group's health is the leader's. Only the CLI's
        # serve runs headless: the server module ignores --headless and starts an engine core of its own, which
        # then fails on a follower node ("collective_rpc should not be called on follower node").
        worker["command"] = list(HEADLESS_COMMAND)
        worker["args"] = engine["args"] + _mp_args(spec, f"$({WORKER_INDEX_ENV})") + ["--headless"]
    return leader, worker
