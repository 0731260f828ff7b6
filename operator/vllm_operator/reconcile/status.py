"""Pure status computation: what the cluster shows in, phase, conditions and events out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_operator import api
from vllm_operator.engines.metrics import EngineStats
from vllm_operator.engines.startup import STAGE_WORDS
from vllm_operator.render.multinode import GROUP_INDEX_LABEL, WORKER_INDEX_LABEL
from vllm_operator.render.multinode import KIND as LWS_KIND

# Waiting reasons a person must act on: the engine will not come up by itself.
BLOCKING_WAIT_REASONS = {
    "ImagePullBackOff": "ImagePullFailed",
    "ErrImagePull": "ImagePullFailed",
    "InvalidImageName": "ImagePullFailed",
    "CreateContainerConfigError": "ContainerConfigError",
    "CreateContainerError": "ContainerConfigError",
    "CrashLoopBackOff": "EngineCrashLooping",
}
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class Problem:
    pod: str
    reason: str
    message: str
    blocking: bool = False


@dataclass(frozen=True)
class Observation:
    """What the operator knows about one LLMDeployment at one moment."""

    name: str
    namespace: str
    generation: int
    desired_replicas: int
    spec_error: str | None = None
    endpoint: str | None = None
    served_model: str | None = None
    selector: str | None = None
    # The engine Deployment, or LeaderWorkerSet with accelerator.nodesPerReplica > 1.
    workload: Mapping[str, Any] | None = None
    # The serving Pods: one per replica, the group leaders across nodes; and the groups' other Pods.
    pods: Sequence[Mapping[str, Any]] = ()
    workers: Sequence[Mapping[str, Any]] = ()
    group_size: int = 1
    engine: EngineStats | None = None
    # Pod name -> why its engine looks unhealthy from /health or /metrics.
    unhealthy: Mapping[str, str] = field(default_factory=dict)
    # Children the apiserver refused to take, worded by the apiserver.
    apply_errors: Sequence[str] = ()
    # Objects named like a child that are not this LLMDeployment's, and so left alone.
    conflicts: Sequence[str] = ()
    # status.autoscaling, when spec.autoscaling is set.
    autoscaling: Mapping[str, Any] | None = None
    # Another autoscaler (an HPA, KEDA's) that targets this LLMDeployment too.
    autoscaler_conflict: str | None = None
    # status.benchmark: the latest benchmark request and its result (benchmark/__init__.py).
    benchmark: Mapping[str, Any] | None = None
    # The fit check: why the model cannot fit (nothing is created then), or status.capacity when it can.
    does_not_fit: str | None = None
    capacity: Mapping[str, Any] | None = None
    # status.cache while a download Job fills the cache claim (cache/download.py), and the reason and message
    # of a download that failed for good.
    cache: Mapping[str, Any] | None = None
    download_failed: tuple[str, str] | None = None
    # status.startup: the stage of each replica still starting (engines/startup.py).
    startup: Mapping[str, Any] | None = None
    # status.adapters when LoRA is on: each adapter in the started engines (adapters/sync.py).
    adapters: Sequence[Mapping[str, Any]] | None = None


def past_startup(pod: Mapping[str, Any]) -> bool:
    """Past its startup probe: only such engines serve /metrics, and their startup stages are over."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return bool(statuses) and all(s.get("started") for s in statuses)


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


# The scheduler's words while a new cache claim is being provisioned: a wait, not a placement failure.
CLAIM_BINDING = "unbound immediate PersistentVolumeClaims"


def _unschedulable_message(pod: Mapping[str, Any]) -> str | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
            message = condition.get("message") or "no node fits the Pod"
            return None if CLAIM_BINDING in message else message
    return None


def _member(pod: Mapping[str, Any]) -> dict[str, Any]:
    """status.groups[].members[]: one Pod of a group, its rank, node and state in a word."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    rank = int((meta.get("labels") or {}).get(WORKER_INDEX_LABEL, "0"))
    problems = pod_problems(pod)
    unschedulable = _unschedulable_message(pod)
    if meta.get("deletionTimestamp"):
        state, message = "Terminating", None
    elif problems:
        state, message = "Failed", problems[0].message
    elif unschedulable:
        state, message = "Unschedulable", unschedulable
    elif _is_ready(pod):
        state, message = "Ready", None
    elif status.get("phase") == "Running":
        state, message = "Running", None
    else:
        state, message = "Pending", None
    member = {"pod": meta.get("name", "?"), "role": "leader" if rank == 0 else "worker", "rank": rank, "state": state}
    if node := (pod.get("spec") or {}).get("nodeName"):
        member["node"] = node
    if message:
        member["message"] = message[:MAX_MESSAGE]
    return member


def _holds_back(member: Mapping[str, Any]) -> str:
    where = f" on node {member['node']}" if member.get("node") else ""
    why = f": {member['message']}" if member.get("message") else ""
    return f"{member['role']} {member['pod']} (rank {member['rank']}{where}) is {member['state']}{why}"


def replica_groups(leaders: Sequence[Mapping[str, Any]], workers: Sequence[Mapping[str, Any]],
                   size: int) -> list[dict[str, Any]]:
    """status.groups: each group of a replica across nodes, and the first member that holds it back."""
    by_group: dict[int, list[dict[str, Any]]] = {}
    for pod in [*leaders, *workers]:
        index = (pod.get("metadata", {}).get("labels") or {}).get(GROUP_INDEX_LABEL, "")
        if index.isdigit():
            by_group.setdefault(int(index), []).append(_member(pod))
    groups = []
    for index, members in sorted(by_group.items()):
        members.sort(key=lambda m: (m["rank"], m["pod"]))
        leader = next((m for m in members if m["role"] == "leader" and m["state"] != "Terminating"), None)
        running = [m for m in members if m["role"] == "worker" and m["state"] in ("Ready", "Running")]
        group: dict[str, Any] = {"index": index, "members": members, "workersReady": f"{len(running)}/{size - 1}",
                                 "ready": leader is not None and leader["state"] == "Ready" and len(running) >= size - 1}
        stuck = next((m for m in members if m["state"] in ("Failed", "Unschedulable", "Terminating")), None)
        if stuck is not None:
            group["message"] = _holds_back(stuck)
        elif leader is None:
            group["message"] = "its leader Pod does not exist yet"
        elif len([m for m in members if m["role"] == "worker"]) < size - 1:
            group["message"] = f"{len(members) - 1} of its {size - 1} worker Pods exist"
        elif not group["ready"]:
            waiting = next((m for m in members if m["state"] == "Pending"), leader)
            group["message"] = (_holds_back(waiting) if waiting is not leader or leader["state"] == "Pending"
                                else f"leader {leader['pod']} is {leader['state']}: the engine is loading, or waits "
                                     "for its workers to join")
        groups.append(api.ReplicaGroup.model_validate(group).model_dump(by_alias=True, exclude_none=True))
    return groups


def _tail(text: str | None, lines: int = 5) -> str:
    if not text:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def pod_problems(pod: Mapping[str, Any]) -> list[Problem]:
    """Container failures of one engine Pod, worded for a person."""
    name = pod.get("metadata", {}).get("name", "?")
    problems = []
    for status in pod.get("status", {}).get("containerStatuses") or []:
        state, last = status.get("state") or {}, status.get("lastState") or {}
        waiting, terminated = state.get("waiting"), state.get("terminated") or last.get("terminated")
        if waiting and waiting.get("reason") in BLOCKING_WAIT_REASONS:
            reason = BLOCKING_WAIT_REASONS[waiting["reason"]]
            detail = waiting.get("message") or waiting["reason"]
            if terminated and reason == "EngineCrashLooping":
                detail = f"exit code {terminated.get('exitCode')} ({terminated.get('reason', 'Error')}): " + (
                    _tail(terminated.get("message")) or detail
                )
            problems.append(Problem(name, reason, f"pod {name}: {detail}", blocking=True))
        elif terminated and terminated.get("exitCode", 0) != 0 and not status.get("ready"):
            reason = "EngineOOMKilled" if terminated.get("reason") == "OOMKilled" else "EngineExited"
            detail = _tail(terminated.get("message"))
            problems.append(Problem(
                name, reason,
                f"pod {name}: engine exited with code {terminated.get('exitCode')} ({terminated.get('reason', 'Error')})"
                + (f": {detail}" if detail else ""),
            ))
    return problems


def deployment_problems(deployment: Mapping[str, Any] | None) -> list[Problem]:
    """What the Deployment controller could not do: create Pods (a quota, PodSecurity, a LimitRange
    refused them) or finish a rollout in time, in the apiserver's own words."""
    problems = []
    for condition in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            problems.append(Problem("", "ReplicaFailure", "engine Pods cannot be created: "
                                    + (condition.get("message") or condition.get("reason") or "ReplicaFailure"),
                                    blocking=True))
        elif condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            problems.append(Problem("", "RolloutStuck", "the engine rollout made no progress: "
                                    + (condition.get("message") or "progress deadline exceeded")))
    return problems


def _condition(
    previous: Mapping[str, Mapping[str, Any]], generation: int, now: str,
    type_: str, status: bool, reason: str, message: str,
) -> dict[str, Any]:
    value = "True" if status else "False"
    old = previous.get(type_)
    unchanged = old is not None and old.get("status") == value
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "observedGeneration": generation,
        "lastTransitionTime": old["lastTransitionTime"] if unchanged and old.get("lastTransitionTime") else now,
    }


def _rollout_in_progress(obs: Observation) -> bool:
    workload = obs.workload
    if workload is None:
        return True
    status = workload.get("status") or {}
    if workload.get("kind") == LWS_KIND:
        # No observedGeneration there: its UpdateInProgress condition says a rollout is under way.
        behind = any(c.get("type") == "UpdateInProgress" and c.get("status") == "True"
                     for c in status.get("conditions") or [])
    else:
        behind = status.get("observedGeneration", 0) < workload.get("metadata", {}).get("generation", 0)
    return (
        behind
        or status.get("updatedReplicas", 0) < obs.desired_replicas
        or status.get("replicas", 0) > obs.desired_replicas
    )


def compute_status(obs: Observation, previous: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The whole status subresource for an observation; ``previous`` keeps transition times."""
    prev_conditions = {c["type"]: c for c in previous.get("conditions") or []}

    def cond(type_: str, status: bool, reason: str, message: str) -> dict[str, Any]:
        return _condition(prev_conditions, obs.generation, now, type_, status, reason, message)

    status: dict[str, Any] = {"observedGeneration": obs.generation}
    if obs.benchmark is not None:
        status["benchmark"] = dict(obs.benchmark)
    if obs.capacity is not None:
        status["capacity"] = dict(obs.capacity)
    if obs.cache is not None:
        status["cache"] = dict(obs.cache)
    refused = ("InvalidSpec", obs.spec_error) if obs.spec_error is not None else (
        ("DoesNotFit", obs.does_not_fit) if obs.does_not_fit is not None else obs.download_failed)
    if refused is not None:
        reason, message = refused
        status.update(phase="Failed", conditions=[
            cond("Ready", False, reason, message),
            cond("Progressing", False, reason, "fix the spec to continue"),
            cond("Degraded", True, reason, message),
        ])
        return status

    pods = [p for p in obs.pods if not p.get("metadata", {}).get("deletionTimestamp")]
    workers = [p for p in obs.workers if not p.get("metadata", {}).get("deletionTimestamp")]
    groups = replica_groups(obs.pods, obs.workers, obs.group_size) if obs.group_size > 1 else None
    ready = sum(1 for g in groups if g["ready"]) if groups is not None else sum(1 for p in pods if _is_ready(p))
    # Across nodes, the first group held back and the member that holds it: what the Ready condition names.
    held = next((g for g in groups or () if not g["ready"] and g.get("message")), None)
    # The stages are read from the logs once per scrape; a Pod that started since is over them already.
    starting = {p["metadata"]["name"] for p in pods if not past_startup(p)}
    startup = [r for r in (obs.startup or {}).get("replicas") or [] if r["pod"] in starting]
    unschedulable = [(p["metadata"]["name"], m) for p in [*pods, *workers] if (m := _unschedulable_message(p))]
    # Problems of the children themselves come first: they say why the Pods are missing or unreachable.
    children = [Problem("", "ChildConflict", conflict, blocking=True) for conflict in obs.conflicts]
    children += [Problem("", "ApplyFailed", error, blocking=True) for error in obs.apply_errors]
    children += deployment_problems(obs.workload)
    if obs.autoscaler_conflict is not None:
        children.append(Problem("", "AutoscalerConflict", obs.autoscaler_conflict))
    problems = children + [problem for p in [*pods, *workers] for problem in pod_problems(p)]
    problems += [Problem(pod, "EngineUnhealthy", f"pod {pod}: {why}") for pod, why in sorted(obs.unhealthy.items())]
    rolling = _rollout_in_progress(obs)
    downloading = obs.cache is not None and obs.cache.get("phase") in ("Pending", "Downloading")

    if obs.desired_replicas == 0 and obs.autoscaling is not None:
        phase, ready_reason = "Idle", "ScaledToZero"
        ready_message = (f"scaled to zero: {obs.autoscaling['reason']}; the cache claim stays, and kubectl scale or "
                         "a spec edit wakes it")
    elif obs.desired_replicas == 0:
        phase, ready_reason, ready_message = "Pending", "ScaledToZero", "spec.replicas is 0"
    elif downloading and ready == 0 and not problems:
        phase, ready_reason = "Downloading", "Downloading"
        ready_message = f"{obs.cache.get('message')}; the engines start once the model is in the cache"
    elif ready >= obs.desired_replicas and not problems:
        phase, ready_reason, ready_message = "Ready", "EngineReady", f"{ready}/{obs.desired_replicas} replicas ready"
    elif ready > 0 or (problems and not any(p.blocking for p in problems)):
        phase, ready_reason = "Degraded", "ReplicasUnavailable"
        ready_message = f"{ready}/{obs.desired_replicas} replicas ready"
        if children:
            ready_reason, ready_message = children[0].reason, f"{ready_message}; {children[0].message}"
        elif held is not None:
            ready_message = f"{ready_message}; group {held['index']}: {held['message']}"
    elif problems:
        phase, ready_reason, ready_message = "Failed", problems[0].reason, problems[0].message
    elif unschedulable:
        phase, ready_reason = "Pending", "Unschedulable"
        ready_message = f"pod {unschedulable[0][0]}: {unschedulable[0][1]}"
        if held is not None:
            ready_message = f"group {held['index']}: {held['message']}"
    elif any((p.get("status") or {}).get("phase") == "Running" for p in pods):
        phase, ready_reason, ready_message = "Loading", "EngineLoading", "the engine is loading the model"
        if startup:
            ready_message = "the engines are starting: " + ", ".join(
                f"pod {r['pod']} {STAGE_WORDS[r['stage']]} since {r['since']}" for r in startup)
    else:
        phase, ready_reason, ready_message = "Pending", "PodsPending", "waiting for engine Pods to start"
        if any(CLAIM_BINDING in str(c.get("message")) for p in pods for c in p.get("status", {}).get("conditions") or []):
            ready_reason = "ClaimBinding"
            ready_message = ("waiting for the cache PersistentVolumeClaim to bind; if this lasts, check that a "
                             "StorageClass provisions it (kubectl describe pvc)")

    conditions = [
        cond("Ready", phase == "Ready", ready_reason, ready_message),
        cond("Progressing", True, "Downloading", "the engine Deployment follows the download")
        if phase == "Downloading" else
        cond("Progressing", rolling, "RollingOut" if rolling else "RolloutComplete",
             "the engine Deployment is rolling out" if rolling else "the engine Deployment is up to date"),
        cond("Degraded", bool(problems), problems[0].reason if problems else "AsExpected",
             "; ".join(p.message for p in problems) if problems else "no engine problems seen"),
        cond("Unschedulable", bool(unschedulable), "Unschedulable" if unschedulable else "Scheduled",
             f"pod {unschedulable[0][0]}: {unschedulable[0][1]}" if unschedulable else "all engine Pods are scheduled"),
    ]
    status.update(
        phase=phase,
        replicas=len(groups) if groups is not None else len(pods),
        readyReplicas=ready,
        ready=f"{ready}/{obs.desired_replicas}",
        conditions=conditions,
    )
    for key, value in (("selector", obs.selector), ("endpoint", obs.endpoint), ("model", obs.served_model)):
        if value is not None:
            status[key] = value
    if obs.autoscaling is not None:
        status["autoscaling"] = dict(obs.autoscaling)
    if startup:
        status["startup"] = {**obs.startup, "replicas": startup}
    if obs.adapters is not None:
        status["adapters"] = [dict(adapter) for adapter in obs.adapters]
        status["loadedAdapters"] = sum(adapter["state"] == "Loaded" for adapter in obs.adapters)
    if groups is not None:
        status["groups"] = groups
    if obs.engine is not None:
        status["engine"] = obs.engine.model_copy(update={"observed_at": now}).model_dump(by_alias=True, exclude_none=True)
    return status


def status_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Kubernetes Events a status change deserves."""
    events = []
    # The way up (Pending, Loading) is routine; reaching Ready, a problem, or leaving those is news.
    # A new LLMDeployment that comes up is therefore two Events: its children created, then Ready.
    news = {"Ready", "Degraded", "Failed"}
    if old.get("phase") != new.get("phase") and (new.get("phase") in news or old.get("phase") in news):
        kind = "Warning" if new.get("phase") in ("Failed", "Degraded") else "Normal"
        ready = next((c for c in new.get("conditions", []) if c["type"] == "Ready"), None)
        detail = f": {ready['message']}" if ready else ""
        events.append((kind, new.get("phase") or "Unknown", f"phase {old.get('phase') or 'None'} -> {new.get('phase')}{detail}"))
    old_conditions = {c["type"]: c for c in old.get("conditions") or []}
    for condition in new.get("conditions") or []:
        before = old_conditions.get(condition["type"])
        if condition["type"] in ("Degraded", "Unschedulable") and condition["status"] == "True" and (
            before is None or before.get("status") != "True" or before.get("message") != condition["message"]
        ):
            events.append(("Warning", condition["reason"], condition["message"]))
    old_adapters = {a["name"]: a for a in old.get("adapters") or []}
    for adapter in new.get("adapters") or []:
        before = old_adapters.get(adapter["name"], {})
        if adapter["state"] == "Loaded" and before.get("state") != "Loaded":
            events.append(("Normal", "AdapterLoaded", f"adapter {adapter['name']} is loaded in all "
                                                      f"{adapter['replicas']} running engines"))
        elif adapter["state"] == "Failed" and (before.get("state") != "Failed"
                                               or before.get("message") != adapter.get("message")):
            events.append(("Warning", "AdapterFailed", f"an engine refused adapter {adapter['name']}: "
                                                       f"{adapter.get('message')}"))
    return events
