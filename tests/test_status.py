"""Phase, conditions and events from what the cluster shows."""

from __future__ import annotations

from typing import Any

from vllm_operator.reconcile.drift import matches
from vllm_operator.reconcile.status import Observation, compute_status, status_events
from vllm_operator.reconcile.writes import Change, classify

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"


def pod(name: str, *, ready: bool = False, phase: str = "Running", unschedulable: str | None = None,
        container: dict[str, Any] | None = None) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable})
    status: dict[str, Any] = {"phase": phase, "conditions": conditions}
    if container is not None:
        status["containerStatuses"] = [{"name": "vllm", "ready": ready, **container}]
    return {"metadata": {"name": name}, "status": status}


def rolled_out(replicas: int) -> dict[str, Any]:
    return {"metadata": {"generation": 2},
            "status": {"observedGeneration": 2, "updatedReplicas": replicas, "replicas": replicas}}


def observe(*pods: dict[str, Any], replicas: int = 1, **extra: Any) -> Observation:
    return Observation("llama", "ai", 3, replicas, workload=rolled_out(replicas), pods=pods, **extra)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_ready_when_all_replicas_ready() -> None:
    status = compute_status(observe(pod("a", ready=True)), {}, NOW)
    assert status["phase"] == "Ready" and status["ready"] == "1/1"
    assert conditions(status)["Ready"]["status"] == "True"
    assert conditions(status)["Ready"]["observedGeneration"] == 3
    assert conditions(status)["Progressing"]["status"] == "False"


def test_loading_while_engine_starts() -> None:
    status = compute_status(observe(pod("a")), {}, NOW)
    assert status["phase"] == "Loading"
    assert conditions(status)["Ready"]["reason"] == "EngineLoading"


def test_unschedulable_carries_the_scheduler_message() -> None:
    message = "0/4 nodes are available: 2 Insufficient nvidia.com/gpu."
    status = compute_status(observe(pod("a", phase="Pending", unschedulable=message)), {}, NOW)
    assert status["phase"] == "Pending"
    unschedulable = conditions(status)["Unschedulable"]
    assert unschedulable["status"] == "True" and message in unschedulable["message"]


def test_crash_loop_without_ready_replicas_fails_with_exit_code_and_log_tail() -> None:
    crashed = pod("a", container={
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "line1\nValueError: bad flag"}},
        "restartCount": 4,
    })
    status = compute_status(observe(crashed), {}, NOW)
    assert status["phase"] == "Failed"
    degraded = conditions(status)["Degraded"]
    assert degraded["reason"] == "EngineCrashLooping"
    assert "exit code 1" in degraded["message"] and "ValueError: bad flag" in degraded["message"]


def test_engine_restart_is_degraded_not_failed() -> None:
    restarted = pod("a", container={"state": {"running": {}}, "lastState": {"terminated": {"exitCode": 137}}})
    status = compute_status(observe(restarted), {}, NOW)
    assert status["phase"] == "Degraded"
    assert "code 137" in conditions(status)["Degraded"]["message"]


def test_unhealthy_engine_marks_degraded_with_pod_name() -> None:
    status = compute_status(observe(pod("a", ready=True), unhealthy={"a": "GET /health answered 503"}), {}, NOW)
    assert status["phase"] == "Degraded"
    assert "pod a: GET /health answered 503" in conditions(status)["Degraded"]["message"]


def test_partial_readiness_is_degraded() -> None:
    status = compute_status(observe(pod("a", ready=True), pod("b"), replicas=2), {}, NOW)
    assert status["phase"] == "Degraded" and status["ready"] == "1/2"


def test_invalid_spec_fails() -> None:
    obs = Observation("llama", "ai", 4, 0, spec_error="spec.engine.extraArgs: --foo is not a vLLM flag")
    status = compute_status(obs, {}, NOW)
    assert status["phase"] == "Failed"
    assert conditions(status)["Ready"]["reason"] == "InvalidSpec"
    assert "--foo" in conditions(status)["Ready"]["message"]


def test_apply_errors_are_reported() -> None:
    status = compute_status(observe(apply_errors=("applying Service llama failed: forbidden",)), {}, NOW)
    assert status["phase"] == "Failed"
    assert "forbidden" in conditions(status)["Degraded"]["message"]


def test_transition_time_kept_while_status_holds() -> None:
    first = compute_status(observe(pod("a", ready=True)), {}, NOW)
    second = compute_status(observe(pod("a", ready=True)), first, LATER)
    assert conditions(second)["Ready"]["lastTransitionTime"] == NOW
    assert classify(first, second) is Change.NONE
    third = compute_status(observe(pod("a")), second, LATER)
    assert conditions(third)["Ready"]["lastTransitionTime"] == LATER


def test_scrape_time_alone_is_no_change() -> None:
    old = {"phase": "Ready", "engine": {"requestsRunning": 0, "lastScrapeTime": NOW, "observedAt": NOW}}
    assert classify(old, {"phase": "Ready", "engine": {"requestsRunning": 0, "lastScrapeTime": LATER,
                                                       "observedAt": LATER}}) is Change.NONE
    assert classify(old, {"phase": "Ready", "engine": {"requestsRunning": 1, "lastScrapeTime": LATER}}) \
        is Change.FIGURES


def test_events_for_phase_changes_and_new_problems() -> None:
    loading = compute_status(observe(pod("a")), {}, NOW)
    stuck = compute_status(observe(pod("a", phase="Pending", unschedulable="0/4 nodes are available")), loading, NOW)
    events = status_events(loading, stuck)
    assert ("Warning", "Unschedulable", "pod a: 0/4 nodes are available") in events
    assert not any(e[1] == "Pending" for e in events), "the way up is routine"
    assert status_events(stuck, stuck) == []


def test_drift_ignores_defaults_and_compares_quantities_by_value() -> None:
    want = {"spec": {"resources": {"requests": {"storage": "1Gi"}}, "ports": [{"port": 80}]},
            "metadata": {"ownerReferences": [{"uid": "u"}]}}
    have = {"spec": {"resources": {"requests": {"storage": "1024Mi"}}, "ports": [{"port": 80, "protocol": "TCP"}],
                     "clusterIP": "10.0.0.1"},
            "metadata": {"ownerReferences": [{"uid": "other"}, {"uid": "u", "kind": "X"}]}}
    assert matches(want, have)
    assert not matches({"spec": {"ports": [{"port": 81}]}}, have)
    assert not matches({"spec": {"image": "a:1"}}, {"spec": {"image": "a:2"}})
    assert not matches({"spec": {"args": ["--x"]}}, {"spec": {"args": ["--x", "--y"]}})


def test_a_new_llmdeployment_that_comes_up_is_one_phase_event() -> None:
    steps = [compute_status(observe(pod("a", phase="Pending")), {}, NOW)]
    steps.append(compute_status(observe(pod("a")), steps[-1], NOW))
    steps.append(compute_status(observe(pod("a", ready=True)), steps[-1], NOW))
    events = [e for before, after in zip([{}, *steps], steps) for e in status_events(before, after)]
    assert [e[1] for e in events] == ["Ready"]
    back = compute_status(observe(pod("a")), steps[-1], LATER)
    assert [e[1] for e in status_events(steps[-1], back)] == ["Loading"], "leaving Ready is news"


def test_a_second_autoscaler_is_reported() -> None:
    status = compute_status(observe(pod("a", ready=True), autoscaler_conflict="HorizontalPodAutoscaler x also "
                                    "scales this LLMDeployment"), {}, NOW)
    assert status["phase"] == "Degraded"
    assert conditions(status)["Degraded"]["reason"] == "AutoscalerConflict"


def test_a_claim_still_binding_is_a_wait_not_unschedulable() -> None:
    binding = pod("a", phase="Pending", unschedulable="0/5 nodes are available: pod has unbound immediate "
                  "PersistentVolumeClaims. preemption: 0/5 nodes are available")
    status = compute_status(observe(binding), {}, NOW)
    assert conditions(status)["Unschedulable"]["status"] == "False"
    assert status["phase"] == "Pending" and not status_events({}, status)
    assert conditions(status)["Ready"]["reason"] == "ClaimBinding"


DOWNLOADING = {"phase": "Downloading", "job": "llama-cache-pull-0a1b2c3d", "bytesTotal": 1000, "bytesDone": 420,
               "percent": 42.0, "message": "downloading org/llama: 420 B of 1.0 KB"}


def test_downloading_before_any_engine_then_loading_once_the_engines_run() -> None:
    waiting = Observation("llama", "ai", 3, 1, cache=DOWNLOADING)
    status = compute_status(waiting, {}, NOW)
    assert status["phase"] == "Downloading" and status["cache"] == DOWNLOADING
    ready = conditions(status)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "Downloading") and "420 B" in ready["message"]
    assert conditions(status)["Progressing"]["reason"] == "Downloading"
    assert conditions(status)["Degraded"]["status"] == "False"
    done = {**DOWNLOADING, "phase": "Ready", "bytesDone": 1000, "percent": 100.0}
    assert compute_status(observe(pod("a"), cache=done), status, LATER)["phase"] == "Loading"


def test_engines_that_serve_an_earlier_model_keep_their_phase_while_the_next_one_downloads() -> None:
    assert compute_status(observe(pod("a", ready=True), cache=DOWNLOADING), {}, NOW)["phase"] == "Ready"


def test_a_failed_download_fails_the_llmdeployment_with_the_pullers_reason_and_a_warning() -> None:
    message = "org/nope does not exist on the hub: check model.name; delete the Job ... to try again"
    failed = Observation("llama", "ai", 3, 1, cache={"phase": "Failed", "job": "j", "message": message},
                         download_failed=("RepositoryNotFound", message))
    status = compute_status(failed, compute_status(Observation("llama", "ai", 3, 1, cache=DOWNLOADING), {}, NOW), LATER)
    assert status["phase"] == "Failed" and status["cache"]["phase"] == "Failed"
    assert (conditions(status)["Ready"]["reason"], conditions(status)["Ready"]["message"]) == (
        "RepositoryNotFound", message)
    events = status_events({"phase": "Downloading"}, status)
    assert ("Warning", "Failed", f"phase Downloading -> Failed: {message}") in events
