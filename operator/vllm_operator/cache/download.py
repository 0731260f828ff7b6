"""What the download Job says, as ``status.cache``: pure functions over the Job, its Pods and the puller's /progress.

The puller (images/model-puller/puller.py) serves its progress as JSON on the Pod's address while it runs, and
writes its outcome (the resolved commit and byte counts, or a reason and what to do) as the termination message.
A Job completed without one (a simulated node runs no puller) is Ready with unknown byte counts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_operator import api
from vllm_operator.reconcile.drift import controller_uid
from vllm_operator.reconcile.writes import CACHE_FIGURES
from vllm_operator.render.manifests import MANAGED_BY, SELECTOR_LABEL
from vllm_operator.render.puller import COMPONENT, CONTAINER, PROGRESS_PORT

RETRY_ADVICE = ("change model.name, model.revision or the file patterns to download something else, or delete the "
                "Job {job} to try again")


@dataclass(frozen=True)
class Download:
    """``status.cache``, whether the engines may start, and what stops the download: its failure (reason and
    message) or a conflict."""

    status: dict[str, Any]
    ready: bool = False
    failure: tuple[str, str] | None = None
    conflict: str | None = None  # a Job of the download's name that this operator did not make


def made_by_operator(job: Mapping[str, Any]) -> bool:
    """Whether a Job is a download Job of this operator (of any LLMDeployment): only then is it read."""
    meta = job["metadata"]
    labels = meta.get("labels") or {}
    controller = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), {})
    return (labels.get("app.kubernetes.io/managed-by") == MANAGED_BY and labels.get("app.kubernetes.io/component")
            == COMPONENT and controller.get("kind") == api.KIND
            and str(controller.get("apiVersion", "")).startswith(f"{api.GROUP}/"))


def job_owner(job: Mapping[str, Any]) -> str | None:
    """The LLMDeployment whose label the Job and its Pods carry (the one that created it)."""
    return (job["metadata"].get("labels") or {}).get(SELECTOR_LABEL)


def job_pods(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    uid = job["metadata"].get("uid")
    return [pod for pod in pods if controller_uid(pod) == uid]


def finished(job: Mapping[str, Any]) -> str | None:
    """'Complete' or 'Failed' once the Job controller says so, else None."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return str(condition["type"])
    return None


def progress_url(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The /progress of the Job's running puller, while it runs."""
    if finished(job) is not None:
        return None
    for pod in job_pods(job, pods):
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if status.get("phase") == "Running" and ip and not pod["metadata"].get("deletionTimestamp"):
            host = f"[{ip}]" if ":" in ip else ip
            return f"http://{host}:{PROGRESS_PORT}/progress"
    return None


def _terminated(pod: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(finishedAt, the puller's termination message) of a Pod whose puller ended; a message that is no JSON (the
    log lines of a crash) becomes ``{"message": ...}``."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if status.get("name") != CONTAINER or terminated is None:
            continue
        text = (terminated.get("message") or "").strip()
        try:
            message = json.loads(text) if text else {}
        except json.JSONDecodeError:
            message = {"message": " | ".join(text.splitlines()[-3:])}
        return str(terminated.get("finishedAt") or ""), message if isinstance(message, dict) else {}
    return None


def _last_outcome(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    ended = [found for pod in job_pods(job, pods) if (found := _terminated(pod)) is not None]
    return max(ended, key=lambda item: item[0])[1] if ended else {}


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _cache(**fields: Any) -> dict[str, Any]:
    return api.CacheStatus.model_validate(fields).model_dump(by_alias=True, exclude_none=True)


def _counts(outcome: Mapping[str, Any]) -> dict[str, Any]:
    return {"bytesTotal": outcome.get("bytesTotal"), "bytesDone": outcome.get("bytesDone"),
            "revision": outcome.get("revision")}


def download(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], progress: Mapping[str, Any] | None,
             previous: Mapping[str, Any] | None, owner_name: str) -> Download:
    """What the Job ``job`` (with the Pods of its LLMDeployment, ``pods``) says now. ``progress`` is its puller's
    /progress answer, if one came; ``previous`` the status.cache last written."""
    name = job["metadata"]["name"]
    shared = job_owner(job) != owner_name
    by = f" (Job {name} of LLMDeployment {job_owner(job)}, which shares the claim)" if shared else f" (Job {name})"
    end = finished(job)
    if end == "Complete":
        outcome = _last_outcome(job, pods)
        revision = outcome.get("revision")
        message = f"{outcome.get('repo') or 'the model'} is in the cache" + (
            f" at commit {revision}" if revision else "") + by
        return Download(_cache(phase="Ready", percent=100.0, job=name, message=message, **_counts(outcome)), ready=True)
    if end == "Failed":
        outcome = _last_outcome(job, pods)
        condition = next((c for c in job["status"]["conditions"] if c.get("type") == "Failed"), {})
        reason = outcome.get("reason") or "DownloadFailed"
        detail = outcome.get("message") or condition.get("message") or condition.get("reason") or "the Job failed"
        message = f"the download failed{by}: {detail}; {RETRY_ADVICE.format(job=name)}"
        status = _cache(phase="Failed", job=name, message=message, **_counts(outcome))
        return Download(status, failure=(reason, message))
    if progress is not None and progress.get("phase") in ("Downloading", "Ready"):
        total = progress.get("bytesTotal")
        message = f"downloading {progress.get('repo')}" + (
            f": {_size(progress.get('bytesDone') or 0)} of {_size(total)}" if total is not None else "") + by
        return Download(_cache(phase="Downloading", job=name, message=message, revision=progress.get("revision"),
                               **{key: progress.get(key) for key in ("bytesTotal", *CACHE_FIGURES)}))
    if progress is None and previous is not None and previous.get("job") == name \
            and previous.get("phase") == "Downloading":
        return Download(dict(previous))  # one missed read: the figures last written stand
    failed = (job.get("status") or {}).get("failed") or 0
    message = f"waiting for the download to start{by}"
    unschedulable = next((c.get("message") for pod in job_pods(job, pods)
                          for c in (pod.get("status") or {}).get("conditions") or []
                          if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"), None)
    if unschedulable:
        message += f": its Pod cannot be scheduled: {unschedulable}"
    if failed:
        last = _last_outcome(job, pods)
        why = ": ".join(part for part in (last.get("reason"), last.get("message")) if part) or "it failed"
        message = f"attempt {failed + 1} of the download{by}, after: {why}"
    return Download(_cache(phase="Pending", job=name, message=message))
