"""Serving benchmarks on demand: the request, its Job, its result, and what the status says meanwhile.

Pure functions. A request is the LLMDeployment's ``llm.vllm-operator.io/benchmark`` annotation (JSON of
``api.BenchmarkRequest``); a new id asks for a new run. The run is a Job with the engine image that runs
vLLM's own serving benchmark (``wrapper.py``) against the LLMDeployment's Service, with its API key, and
hands the figures back as its termination message. ``plan`` decides, from the request, readiness, the
benchmark Jobs and Pods that exist and the benchmark status last written, what to create, delete,
record and say: one run at a time per LLMDeployment, and only while it is Ready.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vllm_operator import api
from vllm_operator.api import BenchmarkRequest, BenchmarkResults, LLMDeploymentSpec, parse_model_source
from vllm_operator.reconcile.drift import controller_uid
from vllm_operator.render.engine_args import CACHE_MOUNT, HF_HOME, MODEL_MOUNT, engine_image, model_argument, \
    served_model_name
from vllm_operator.render.manifests import Manifest, Owner, common_labels, run_once_job
from vllm_operator.render.profiles import profile_for

ID_ANNOTATION = f"{api.GROUP}/benchmark-id"
# The run's settings on its Job too: a status write that was lost cannot lose them.
SETTINGS_ANNOTATION = f"{api.GROUP}/benchmark-settings"
COMPONENT = "benchmark"
MESSAGE_PATH = "/dev/termination-log"
WRAPPER = (Path(__file__).parent / "wrapper.py").read_text()
# A benchmark that has not finished in an hour is stuck; a longer one should be split into several.
DEADLINE_SECONDS = 3600
# The figures the status shows are these percentiles; the report keeps every figure vLLM computed.
PERCENTILE_METRICS = "ttft,tpot,itl,e2el"
PERCENTILES = "50,99"
# Job names become Pod label values (job-name), which hold 63 characters.
MAX_NAME = 63
Event = tuple[str, str, str]  # (type, reason, message)


@dataclass(frozen=True)
class Parsed:
    """The annotation: a valid request, or why it is not one (with the id it gave, if any)."""

    request: BenchmarkRequest | None = None
    error: str | None = None
    id: str | None = None


def parse_request(annotations: Mapping[str, str] | None) -> Parsed | None:
    """The benchmark request of an LLMDeployment's annotations; None when there is none."""
    text = (annotations or {}).get(api.BENCHMARK_ANNOTATION)
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return Parsed(error=f"annotation {api.BENCHMARK_ANNOTATION} is not JSON: {exc}", id="invalid")
    if not isinstance(raw, dict):
        return Parsed(error=f"annotation {api.BENCHMARK_ANNOTATION} must be a JSON object", id="invalid")
    try:
        return Parsed(request=BenchmarkRequest.model_validate(raw))
    except ValidationError as error:
        given = raw.get("id")
        return Parsed(error=describe_request_error(error),
                      id=given if isinstance(given, str) and given else "invalid")


def describe_request_error(error: ValidationError) -> str:
    """pydantic's errors as one line: 'benchmark.numPrompts: Input should be greater than or equal to 1'."""
    parts = []
    for item in error.errors():
        location = ".".join(str(p) for p in ("benchmark", *item["loc"]))
        parts.append(f"{location}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def job_name(owner_name: str, request_id: str) -> str:
    digest = hashlib.sha256(request_id.encode()).hexdigest()[:8]
    suffix = f"-bench-{digest}"
    return owner_name[:MAX_NAME - len(suffix)].rstrip("-.") + suffix


def report_name(owner_name: str) -> str:
    return f"{owner_name}-benchmark"


def base_url(spec: LLMDeploymentSpec, owner: Owner) -> str:
    """The Service, as clients reach it; vLLM's benchmark appends /v1/completions."""
    return f"http://{owner.name}.{owner.namespace}.svc.cluster.local:{spec.service.port}"


def benchmark_args(spec: LLMDeploymentSpec, owner: Owner, request: BenchmarkRequest) -> list[str]:
    """Options of ``vllm bench serve`` for one request; never a credential."""
    settings = request.resolved()
    args = [
        "--base-url", base_url(spec, owner),
        # The model's own files give the tokenizer the benchmark counts tokens with.
        "--model", model_argument(spec),
        "--served-model-name", served_model_name(spec, owner.name),
        "--dataset-name", settings.dataset,
        "--num-prompts", str(settings.num_prompts),
        "--percentile-metrics", PERCENTILE_METRICS,
        "--metric-percentiles", PERCENTILES,
        # Keeps the per-request errors in the result for the wrapper; nothing is written to a file.
        "--save-detailed",
        "--disable-tqdm",
    ]
    if settings.dataset_path is not None:
        args += ["--dataset-path", f"{CACHE_MOUNT}/{settings.dataset_path}"]
    for flag, value in (("--input-len", settings.input_len), ("--output-len", settings.output_len),
                        ("--request-rate", settings.request_rate), ("--max-concurrency", settings.max_concurrency),
                        ("--tokenizer", spec.model.tokenizer)):
        if value is not None:
            args += [flag, str(value)]
    if spec.model.trust_remote_code:
        args.append("--trust-remote-code")
    return args


def _shares_cache(spec: LLMDeploymentSpec) -> bool:
    """Whether the benchmark mounts the engine's cache claim (a ReadWriteOncePod claim admits one Pod only)."""
    return spec.cache.enabled and spec.cache.access_mode != "ReadWriteOncePod"


def _colocated(spec: LLMDeploymentSpec) -> bool:
    """Whether the benchmark must run on an engine's node: its claims may attach to that node only."""
    shared_cache = _shares_cache(spec) and spec.cache.access_mode != "ReadWriteMany"
    return shared_cache or parse_model_source(spec.model.name)[0] == "pvc"


def _volumes(spec: LLMDeploymentSpec, owner: Owner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The cache (read-only: the benchmark reads the tokenizer and datasets, never writes weights) and the model claim."""
    if _shares_cache(spec):
        claim = spec.cache.existing_claim or f"{owner.name}-cache"
        cache: dict[str, Any] = {"name": "cache", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    else:
        cache = {"name": "cache", "emptyDir": {}}
    volumes = [cache]
    mounts = [{"name": "cache", "mountPath": CACHE_MOUNT, "readOnly": _shares_cache(spec)}]
    kind, claim, _path = parse_model_source(spec.model.name)
    if kind == "pvc":
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    return volumes, mounts


def _env(spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "BENCHMARK_MESSAGE_PATH", "value": MESSAGE_PATH},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
    ]
    if _shares_cache(spec) or parse_model_source(spec.model.name)[0] != "hf":
        # The Ready engine has put the tokenizer there; a read-only cache cannot take downloads anyway.
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    if spec.model.hf_token_secret_ref is not None:
        ref = spec.model.hf_token_secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if spec.api_key_secret_ref is not None:
        # vLLM's benchmark sends OPENAI_API_KEY as the bearer token.
        ref = spec.api_key_secret_ref
        env.append({"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def job(spec: LLMDeploymentSpec, owner: Owner, request: BenchmarkRequest) -> Manifest:
    """The Job that runs ``request`` against the LLMDeployment of ``spec``."""
    volumes, mounts = _volumes(spec, owner)
    container = {
        "name": "benchmark",
        "image": engine_image(spec),
        "imagePullPolicy": spec.engine.image_pull_policy or "IfNotPresent",
        "command": ["python3", "-c", WRAPPER],
        "args": benchmark_args(spec, owner, request),
        "env": _env(spec),
        "volumeMounts": mounts,
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "terminationMessagePath": MESSAGE_PATH,
    }
    pod: dict[str, Any] = {"volumes": volumes}
    if _colocated(spec):
        engines = {"matchLabels": common_labels(owner.name, "engine")}
        pod["affinity"] = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": engines, "topologyKey": "kubernetes.io/hostname"}]}}
        tolerations = [dict(t) for t in profile_for(spec.accelerator.type).tolerations] + [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
        if tolerations:
            pod["tolerations"] = tolerations
    # A failed benchmark is reported, not repeated against a model that may be struggling.
    return run_once_job(spec, owner, job_name(owner.name, request.id), COMPONENT, container, pod,
                        {"backoffLimit": 0, "activeDeadlineSeconds": DEADLINE_SECONDS},
                        annotations={ID_ANNOTATION: request.id,
                                     SETTINGS_ANNOTATION: json.dumps(_settings(request), sort_keys=True)})


def results(report: Mapping[str, Any]) -> BenchmarkResults:
    """The headline figures of a ``vllm bench serve`` result (its JSON, or the wrapper's part of it)."""

    def seconds(name: str) -> float | None:
        value = report.get(name)
        return None if value is None else value / 1000

    return BenchmarkResults(
        completed_requests=report.get("completed", 0),
        failed_requests=report.get("failed", 0),
        duration_seconds=report.get("duration", 0.0),
        request_throughput=report.get("request_throughput", 0.0),
        output_tokens_per_second=report.get("output_throughput", 0.0),
        ttft_seconds_p50=seconds("p50_ttft_ms"),
        ttft_seconds_p99=seconds("p99_ttft_ms"),
        itl_seconds_p50=seconds("p50_itl_ms"),
        itl_seconds_p99=seconds("p99_itl_ms"),
        first_error=report.get("first_error") or next((e for e in report.get("errors") or [] if e), None),
    )


def headline(request_id: str, figures: BenchmarkResults, report: str) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    return (f"benchmark {request_id}: {figures.request_throughput:.2f} requests/s, "
            f"{figures.output_tokens_per_second:.1f} output tokens/s, TTFT p50/p99 "
            f"{ms(figures.ttft_seconds_p50)}/{ms(figures.ttft_seconds_p99)} ms, ITL p50/p99 "
            f"{ms(figures.itl_seconds_p50)}/{ms(figures.itl_seconds_p99)} ms, {figures.failed_requests} of "
            f"{figures.completed_requests + figures.failed_requests} requests failed; full report in ConfigMap {report}")


# -- the state of one LLMDeployment's benchmarks ------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one reconcile does about benchmarks, in this order: report, create, status, delete."""

    status: dict[str, Any] | None  # status.benchmark to write
    create: Manifest | None = None
    delete: tuple[str, ...] = ()
    report: dict[str, str] | None = None  # data of the report ConfigMap
    events: list[Event] = field(default_factory=list)


def _finished(job_body: Mapping[str, Any]) -> str | None:
    """'Complete' or 'Failed' once the Job controller says so, else None."""
    for condition in (job_body.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return str(condition["type"])
    return None


def _job_failure(job_body: Mapping[str, Any]) -> str:
    for condition in (job_body.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return condition.get("message") or condition.get("reason") or "the Job failed"
    return "the Job failed"


def _termination(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated is not None:
            return dict(terminated)
    return None


def _settings(request: BenchmarkRequest) -> dict[str, Any]:
    return request.resolved().model_dump(by_alias=True, exclude_none=True, exclude={"id"})


def _job_settings(job_body: Mapping[str, Any]) -> dict[str, Any] | None:
    text = (job_body["metadata"].get("annotations") or {}).get(SETTINGS_ANNOTATION)
    try:
        settings = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return settings if isinstance(settings, dict) else None


def _status(**fields: Any) -> dict[str, Any]:
    return api.BenchmarkStatus.model_validate(fields).model_dump(by_alias=True, exclude_none=True)


def _outcome(previous: Mapping[str, Any], job_body: Mapping[str, Any], pod: Mapping[str, Any] | None,
             owner_name: str, now: str) -> tuple[dict[str, Any], dict[str, str] | None] | None:
    """The status of a finished run, and its report; None while its Pod's end is not seen yet."""
    terminated = _termination(pod) if pod is not None else None
    failed = _finished(job_body) == "Failed"
    if terminated is None and not failed:
        return None
    base = {k: v for k, v in previous.items() if k not in ("phase", "message", "completionTime", "results", "report")}
    base.setdefault("settings", _job_settings(job_body))
    text = (terminated or {}).get("message") or ""
    try:
        report = json.loads(text)
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict):
        why = text.strip().splitlines()[-1] if text.strip() else _job_failure(job_body)
        return _status(**base, phase="Failed", message=f"benchmark {previous['id']} failed: {why}",
                       completionTime=(terminated or {}).get("finishedAt") or now), None
    completed_at = report.get("completionTime") or now
    start = report.get("startTime") or base.pop("startTime", None)
    if "error" in report:
        return _status(**{**base, "startTime": start}, phase="Failed", completionTime=completed_at,
                       message=f"benchmark {previous['id']} failed: {report['error']}"), None
    figures = results(report.get("result") or {})
    name = report_name(owner_name)
    full = {"id": previous["id"], "job": job_body["metadata"]["name"], "startTime": start,
            "completionTime": completed_at, "settings": base.get("settings"), "result": report.get("result")}
    data = {"report.json": json.dumps(full, indent=2, sort_keys=True)}
    if figures.completed_requests == 0:
        return _status(**{**base, "startTime": start}, phase="Failed", completionTime=completed_at, report=name,
                       results=figures.model_dump(by_alias=True, exclude_none=True),
                       message=f"benchmark {previous['id']} failed: no request succeeded"
                       + (f" ({figures.first_error})" if figures.first_error else "")), data
    return _status(**{**base, "startTime": start}, phase="Succeeded", completionTime=completed_at, report=name,
                   results=figures.model_dump(by_alias=True, exclude_none=True),
                   message=headline(previous["id"], figures, name)), data


def plan(parsed: Parsed | None, unready: str | None, spec: LLMDeploymentSpec, owner: Owner,
         jobs: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]],
         previous: Mapping[str, Any] | None, now: str) -> Plan:
    """What to do about benchmarks. ``unready`` is None when the LLMDeployment is Ready, else its phase.

    ``jobs`` are the LLMDeployment's benchmark Jobs, ``pods`` its benchmark Pods, ``previous`` the
    status.benchmark last written.
    """
    previous = dict(previous or {})
    status: dict[str, Any] | None = previous or None
    ours = [j for j in jobs if controller_uid(j) == owner.uid]
    running = [j for j in ours if _finished(j) is None]
    delete: list[str] = []
    for done in (j for j in ours if _finished(j) is not None):
        if previous.get("id") == done["metadata"].get("annotations", {}).get(ID_ANNOTATION) \
                and previous.get("phase") == "Running":
            pod = next((p for p in pods if controller_uid(p) == done["metadata"].get("uid")), None)
            outcome = _outcome(previous, done, pod, owner.name, now)
            if outcome is None:
                return _with_events(previous, Plan(status))  # its Pod's end comes with a later event
            status, report = outcome
            # Recorded now; the Job goes once this status is written. The next request waits for the next reconcile.
            return _with_events(previous, Plan(status, delete=(done["metadata"]["name"],), report=report))
        delete.append(done["metadata"]["name"])  # recorded earlier
    if previous.get("phase") == "Running" and not any(j["metadata"]["name"] == previous.get("job") for j in ours):
        status = _status(**{**previous, "phase": "Failed", "completionTime": now,
                            "message": f"benchmark {previous['id']} failed: its Job {previous.get('job')} was "
                            "deleted before it finished"})
        return _with_events(previous, Plan(status, delete=tuple(delete)))
    request = parsed.request if parsed is not None else None
    wanted = request.id if request is not None else parsed.id if parsed is not None else None
    if running:
        current = running[0]
        current_id = current["metadata"].get("annotations", {}).get(ID_ANNOTATION, "")
        if status is None or status.get("id") != current_id or status.get("phase") != "Running":
            status = _status(id=current_id, phase="Running", job=current["metadata"]["name"],
                             startTime=now, message=f"running Job {current['metadata']['name']}",
                             settings=_job_settings(current))
        message = f"running Job {current['metadata']['name']}"
        if wanted is not None and wanted != current_id:
            message += f"; request {wanted} waits for it to finish (one benchmark at a time)"
        status = {**status, "message": message}
        return _with_events(previous, Plan(status, delete=tuple(delete)))
    if parsed is None or (previous.get("id") == wanted and previous.get("phase") in ("Succeeded", "Failed")):
        return _with_events(previous, Plan(status, delete=tuple(delete)))
    assert wanted is not None
    if parsed.error is not None:
        status = _status(id=wanted, phase="Failed", message=f"invalid benchmark request: {parsed.error}")
    elif request is not None and unready is not None:
        status = _status(id=wanted, phase="Waiting", settings=_settings(request),
                         message=f"waits for the LLMDeployment to be Ready (it is {unready}); a benchmark never "
                         "runs against a model that is not")
    elif request is not None:
        manifest = job(spec, owner, request)
        name = manifest["metadata"]["name"]
        status = _status(id=wanted, phase="Running", job=name, startTime=now, message=f"running Job {name}",
                         settings=_settings(request))
        return _with_events(previous, Plan(status, create=manifest, delete=tuple(delete)))
    return _with_events(previous, Plan(status, delete=tuple(delete)))


def _keeping_previous(old: Mapping[str, Any], new: dict[str, Any] | None) -> dict[str, Any] | None:
    """``new`` with status.benchmark.previous: ``old`` when ``new`` is another request and ``old`` finished, else
    what ``old`` kept."""
    if not new:
        return new
    if old.get("id") not in (None, new["id"]) and old.get("phase") in ("Succeeded", "Failed"):
        return {**new, "previous": {k: v for k, v in old.items() if k != "previous"}}
    if old.get("id") == new["id"] and "previous" in old:
        return {**new, "previous": old["previous"]}
    return new


def _with_events(previous: Mapping[str, Any], result: Plan) -> Plan:
    """One Event for each change a person would want to hear of: waiting, started, finished."""
    result = Plan(_keeping_previous(previous, result.status), result.create, result.delete, result.report, result.events)
    new = result.status or {}
    if not new or (previous.get("id"), previous.get("phase"), previous.get("message")) == (
            new.get("id"), new.get("phase"), new.get("message")):
        return result
    phase, message = new["phase"], new["message"]
    started = new["phase"] == "Running" and (previous.get("id"), previous.get("phase")) != (new["id"], "Running")
    if phase == "Failed":
        event = ("Warning", "BenchmarkFailed", message)
    elif phase == "Succeeded":
        event = ("Normal", "BenchmarkSucceeded", message)
    elif started:
        event = ("Normal", "BenchmarkStarted", f"benchmark {new['id']}: {message}")
    else:
        event = ("Normal", "BenchmarkWaiting", f"benchmark {new['id']}: {message}")
    return Plan(result.status, result.create, result.delete, result.report, [event])
