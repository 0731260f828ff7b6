"""The download Job (render/puller.py) and what it says as status.cache (cache/download.py), without a cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from vllm_operator import api
from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.cache.download import download, made_by_operator, progress_url
from vllm_operator.render.manifests import SELECTOR_LABEL, Owner, deployment
from vllm_operator.render.puller import PullerSettings, job_name, pull_job

OWNER = Owner("llama", "ai", "uid-1")
SETTINGS = PullerSettings("registry.example.com/vllm-model-puller:2.4.0", "http://hub.example.com")


def spec(**overrides: Any) -> LLMDeploymentSpec:
    body: dict[str, Any] = {"model": {"name": "org/llama", "hfTokenSecretRef": {"name": "hf", "key": "token"}},
                            "accelerator": {"type": "nvidia", "product": "NVIDIA-H100-80GB-HBM3"},
                            "tolerations": [{"key": "team", "operator": "Exists"}]}
    body.update(overrides)
    return LLMDeploymentSpec.model_validate(body)


def test_the_job_downloads_into_the_engines_cache_with_the_token_and_the_engines_placement() -> None:
    job = pull_job(spec(), OWNER, SETTINGS)
    engines = deployment(spec(), OWNER)["spec"]["template"]["spec"]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert job["metadata"]["ownerReferences"] == [OWNER.reference]
    assert job["metadata"]["labels"][SELECTOR_LABEL] == "llama"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "model-puller"
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 6
    assert {"action": "FailJob", "onExitCodes": {"containerName": "puller", "operator": "In", "values": [2]}} \
        in job["spec"]["podFailurePolicy"]["rules"]
    assert container["image"] == SETTINGS.image
    assert container["command"] == ["python", "/opt/puller/puller.py"]
    assert container["args"][0] == "org/llama" and "--revision" not in container["args"]
    assert container["args"][container["args"].index("--port") + 1] == "8001"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["HF_ENDPOINT"] == "http://hub.example.com"
    assert env["PULLER_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["PULLER_TERMINATION_LOG"] == container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # Same claim, mount path and HF_HOME as the engines; the engines' nodes; as restricted as the engines.
    engine = engines["containers"][0]
    assert pod["volumes"] == [v for v in engines["volumes"] if v["name"] == "cache"]
    assert container["volumeMounts"] == [m for m in engine["volumeMounts"] if m["name"] == "cache"]
    assert env["HF_HOME"] == {e["name"]: e.get("value") for e in engine["env"]}["HF_HOME"]
    assert pod["nodeSelector"] == engines["nodeSelector"] and pod["tolerations"] == engines["tolerations"]
    assert container["securityContext"] == engine["securityContext"]
    assert pod["securityContext"]["seccompProfile"] == engines["securityContext"]["seccompProfile"]
    assert pod["automountServiceAccountToken"] is False
    assert "HF_TOKEN" not in {e["name"] for e in engine["env"]}


def test_without_an_operator_endpoint_the_job_uses_the_hubs_default() -> None:
    container = pull_job(spec(), OWNER, PullerSettings())["spec"]["template"]["spec"]["containers"][0]
    assert "HF_ENDPOINT" not in {e["name"] for e in container["env"]}
    assert container["image"] == "vllm-model-puller:2.4.0"


def test_the_job_name_follows_the_claim_and_what_is_downloaded_not_the_llmdeployment() -> None:
    shared = spec(cache={"existingClaim": "team-models"})
    assert job_name(shared, "a") == job_name(shared, "b")
    assert job_name(shared, "a").startswith("team-models-pull-") and len(job_name(shared, "a")) == 25
    assert job_name(spec(), "a") != job_name(spec(), "b")
    model = {"name": "org/llama"}
    names = {job_name(spec(model=m, cache={"existingClaim": "c"}), "a") for m in (
        model, {**model, "revision": "v2"}, {**model, "allowPatterns": ["*.safetensors"]},
        {**model, "ignorePatterns": ["*.bin"]}, {"name": "org/other"})}
    assert len(names) == 5
    # An unset revision is the default branch, as the puller and the engines read it.
    assert job_name(spec(model={**model, "revision": "main"}), "a") == job_name(spec(model=model), "a")
    long = spec(cache={"existingClaim": "c" * 253})
    assert len(job_name(long, "a")) == 63


def test_patterns_reach_the_puller_with_defaults_for_a_safetensors_checkpoint() -> None:
    args = pull_job(spec(), OWNER, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = [args[i + 1] for i, a in enumerate(args) if a == "--allow-pattern"]
    ignored = [args[i + 1] for i, a in enumerate(args) if a == "--ignore-pattern"]
    assert {"*.json", "*.safetensors", "*.model"} <= set(allowed) and "*.bin" not in allowed
    assert {"original/*", "*.bin", "*.pth", "*.gguf"} <= set(ignored)
    custom = spec(model={"name": "org/llama", "revision": "v2", "allowPatterns": ["*.gguf"], "ignorePatterns": ["x/*"]})
    args = pull_job(custom, OWNER, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["org/llama", "--revision", "v2", "--allow-pattern", "*.gguf", "--ignore-pattern", "x/*",
                    "--port", "8001"]


@pytest.mark.parametrize("patterns", [[], ["../secrets"], ["a/../../b"], ["/etc/*"], ["two words"], [""]])
def test_patterns_that_are_no_relative_globs_are_refused(patterns: list[str]) -> None:
    with pytest.raises(ValidationError):
        api.ModelSpec.model_validate({"name": "org/llama", "allowPatterns": patterns})
    with pytest.raises(ValidationError):
        api.ModelSpec.model_validate({"name": "org/llama", "ignorePatterns": patterns})


def job(*conditions: str, failed: int = 0, owner: str = "llama", **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": "llama-cache-pull-0a1b2c3d", "uid": "job-uid", "labels": {
        SELECTOR_LABEL: owner, "app.kubernetes.io/managed-by": "vllm-operator",
        "app.kubernetes.io/component": "model-puller"}, "ownerReferences": [
        {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "name": owner, "uid": "u", "controller": True}],
        **meta},
        "status": {"failed": failed, "conditions": [{"type": c, "status": "True", "reason": "BackoffLimitExceeded"}
                                                    for c in conditions]}}


def puller_pod(phase: str, message: dict[str, Any] | str | None = None, finished: str = "2026-01-01T00:00:00Z",
               ip: str = "10.0.0.7") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "podIP": ip}
    if message is not None:
        text = message if isinstance(message, str) else json.dumps(message)
        status["containerStatuses"] = [{"name": "puller", "state": {"terminated": {
            "exitCode": 0 if phase == "Succeeded" else 2, "finishedAt": finished, "message": text}}}]
    return {"metadata": {"name": f"pull-{finished}", "ownerReferences": [{"uid": "job-uid", "controller": True}]},
            "status": status}


def test_progress_is_read_from_the_running_puller_only() -> None:
    assert progress_url(job(), [puller_pod("Running")]) == "http://10.0.0.7:8001/progress"
    assert progress_url(job(), [puller_pod("Pending", ip="")]) is None
    assert progress_url(job("Complete"), [puller_pod("Running")]) is None
    other = puller_pod("Running")
    other["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    assert progress_url(job(), [other]) is None


def test_a_running_download_reports_its_progress() -> None:
    progress = {"repo": "org/llama", "phase": "Downloading", "revision": "c0ffee", "bytesTotal": 2_000_000,
                "bytesDone": 500_000, "percent": 25.0, "bytesPerSecond": 100_000.0, "etaSeconds": 15.0}
    result = download(job(), [puller_pod("Running")], progress, None, "llama")
    assert not result.ready and result.failure is None
    assert result.status == {"phase": "Downloading", "job": "llama-cache-pull-0a1b2c3d", "revision": "c0ffee",
                             "bytesTotal": 2_000_000, "bytesDone": 500_000, "percent": 25.0,
                             "bytesPerSecond": 100_000.0, "etaSeconds": 15.0,
                             "message": "downloading org/llama: 500.0 KB of 2.0 MB (Job llama-cache-pull-0a1b2c3d)"}
    # A read that fails keeps the figures last written rather than going back to Pending.
    assert download(job(), [puller_pod("Running")], None, result.status, "llama").status == result.status
    assert download(job(), [], None, None, "llama").status["phase"] == "Pending"


def test_a_download_that_cannot_be_scheduled_says_why() -> None:
    pending = puller_pod("Pending", ip="")
    pending["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": "0/9 nodes are available: 9 node(s) didn't match selector"}]
    result = download(job(), [pending], None, None, "llama")
    assert result.status["phase"] == "Pending" and "didn't match selector" in result.status["message"]


def test_a_shared_job_says_whose_it_is() -> None:
    result = download(job(owner="first"), [], None, None, "second")
    assert "LLMDeployment first" in result.status["message"] and not result.ready


def test_a_completed_job_is_ready_with_the_pullers_figures_or_without_any() -> None:
    outcome = {"phase": "Ready", "repo": "org/llama", "revision": "c0ffee", "bytesTotal": 10, "bytesDone": 10}
    ready = download(job("Complete"), [puller_pod("Succeeded", outcome)], None, None, "llama")
    assert ready.ready and ready.status["revision"] == "c0ffee" and ready.status["percent"] == 100.0
    assert ready.status["bytesTotal"] == ready.status["bytesDone"] == 10
    # A simulated node completes the Pod without running the puller: no termination message.
    simulated = download(job("Complete"), [puller_pod("Succeeded")], None, None, "llama")
    assert simulated.ready and simulated.status["phase"] == "Ready" and "bytesTotal" not in simulated.status


def test_a_failed_job_fails_with_the_pullers_reason_and_says_how_to_retry() -> None:
    outcome = {"phase": "Failed", "repo": "org/llama", "reason": "GatedRepo",
               "message": "org/llama is gated and no token was given: ... model.hfTokenSecretRef"}
    failed = download(job("Failed"), [puller_pod("Failed", outcome)], None, None, "llama")
    assert failed.failure is not None and failed.failure[0] == "GatedRepo"
    assert "model.hfTokenSecretRef" in failed.failure[1]
    assert "delete the Job llama-cache-pull-0a1b2c3d" in failed.failure[1]
    assert failed.status["phase"] == "Failed" and failed.status["message"] == failed.failure[1]
    # A crash before the outcome leaves log lines; with no Pod left, the Job's own condition says why.
    crashed = download(job("Failed"), [puller_pod("Failed", "Traceback\nKeyError: 'x'")], None, None, "llama")
    assert crashed.failure is not None and crashed.failure[0] == "DownloadFailed" and "KeyError" in crashed.failure[1]
    gone = download(job("Failed"), [], None, None, "llama")
    assert gone.failure is not None and "BackoffLimitExceeded" in gone.failure[1]


def test_a_retried_download_says_why_the_last_attempt_failed() -> None:
    last = {"phase": "Failed", "repo": "org/llama", "reason": "HubUnreachable", "message": "cannot reach the hub"}
    result = download(job(failed=1), [puller_pod("Failed", last)], None, None, "llama")
    assert result.status["phase"] == "Pending" and result.failure is None
    assert "attempt 2" in result.status["message"] and "HubUnreachable" in result.status["message"]


def test_only_download_jobs_of_this_operator_are_read() -> None:
    assert made_by_operator(job())
    foreign = job()
    foreign["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "someone"
    assert not made_by_operator(foreign)
    unowned = job()
    unowned["metadata"]["ownerReferences"] = []
    assert not made_by_operator(unowned)
