"""The download Jobs: the model puller (images/model-puller/puller.py) fills the cache claim with the model before
the engines start, and with each LoRA adapter from the hub (hf:// in spec.adapters) before it is loaded.

Pure functions. A Job's name depends on the claim and on what it downloads (repo, revision, file patterns), not
on the LLMDeployment: LLMDeployments that share a claim (cache.existingClaim) and serve the same model share one
Job, and a spec edit that downloads something else makes a new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from vllm_operator.api import AdapterSpec, LLMDeploymentSpec, adapter_source, download_patterns, parse_model_source
from vllm_operator.render.engine_args import CACHE_MOUNT, HF_HOME
from vllm_operator.render.manifests import (
    Manifest,
    Owner,
    _node_selector,
    cache_claim_name,
    run_once_job,
    tolerations,
)

COMPONENT = "model-puller"
CONTAINER = "puller"
PROGRESS_PORT = 8001
SCRIPT = "/opt/puller/puller.py"
TERMINATION_LOG = "/dev/termination-log"
# The puller's exit code for failures a retry cannot fix (no such repo or revision, a gated repo without access).
EXIT_PERMANENT = 2
# Other failures (the hub unreachable, a dropped connection) are retried with the Job's backoff (10 s doubling,
# so about 10 minutes in all), each attempt resuming the bytes already on the claim.
BACKOFF_LIMIT = 6
# The image docs/images.md builds; the operator's --model-puller-image (chart value modelPuller.image) overrides it.
DEFAULT_IMAGE = "vllm-model-puller:2.4.0"
PULLER_UID = 65532  # USER of images/model-puller/Dockerfile
MAX_NAME = 63  # Job names become Pod label values (job-name)
DEFAULT_REVISION = "main"
# What vLLM reads of a PEFT adapter: its config, its weights, and added embeddings where there are any.
ADAPTER_PATTERNS = ("*.json", "adapter_model.*", "new_embeddings.*")


@dataclass(frozen=True)
class Pull:
    """What one Job downloads: a repo at a revision (None: the default branch), the files the patterns select."""

    repo: str
    revision: str | None
    allow: tuple[str, ...]
    ignore: tuple[str, ...] = ()


def model_pull(spec: LLMDeploymentSpec) -> Pull:
    allow, ignore = download_patterns(spec.model)
    return Pull(parse_model_source(spec.model.name)[2], spec.model.revision, tuple(allow), tuple(ignore))


def adapter_pull(adapter: AdapterSpec) -> Pull:
    return Pull(adapter_source(adapter.source)[2], adapter.revision, ADAPTER_PATTERNS)


@dataclass(frozen=True)
class PullerSettings:
    """What the operator's own configuration adds to every download Job."""

    image: str = DEFAULT_IMAGE
    hf_endpoint: str | None = None  # the operator's HF_ENDPOINT: a mirror, or the tests' local hub


def cache_claim_of(spec: LLMDeploymentSpec, owner_name: str) -> str:
    return spec.cache.existing_claim or cache_claim_name(owner_name)


def job_name(spec: LLMDeploymentSpec, owner_name: str, pull: Pull | None = None) -> str:
    """``<claim>-pull-<hash of repo, revision and patterns>``, at most 63 characters; of the model by default."""
    pull = pull or model_pull(spec)
    what = [pull.repo, pull.revision or DEFAULT_REVISION, list(pull.allow), list(pull.ignore)]
    digest = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:8]
    suffix = f"-pull-{digest}"
    return cache_claim_of(spec, owner_name)[:MAX_NAME - len(suffix)].rstrip("-.") + suffix


def puller_args(pull: Pull) -> list[str]:
    args = [pull.repo]
    if pull.revision is not None:
        args += ["--revision", pull.revision]
    for flag, patterns in (("--allow-pattern", pull.allow), ("--ignore-pattern", pull.ignore)):
        for pattern in patterns:
            args += [flag, pattern]
    return args + ["--port", str(PROGRESS_PORT)]


def _env(spec: LLMDeploymentSpec, settings: PullerSettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        # The progress server listens on the Pod's own address, where the operator reads it.
        {"name": "PULLER_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "PULLER_TERMINATION_LOG", "value": TERMINATION_LOG},
    ]
    if settings.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": settings.hf_endpoint})
    token = spec.model.hf_token_secret_ref
    if token is not None:
        # Only here: the engines read the cache offline and never see the token.
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    return env


def pull_job(spec: LLMDeploymentSpec, owner: Owner, settings: PullerSettings, pull: Pull | None = None) -> Manifest:
    """The Job that downloads ``pull`` (the model of ``spec`` by default) into the cache claim."""
    pull = pull or model_pull(spec)
    container = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", SCRIPT],
        "args": puller_args(pull),
        "env": _env(spec, settings),
        "ports": [{"name": "progress", "containerPort": PROGRESS_PORT, "protocol": "TCP"}],
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT}],
        # Downloading is network and disk bound: one core and a few buffers.
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        # The puller writes its outcome as JSON; a crash before that still leaves its last log lines.
        "terminationMessagePath": TERMINATION_LOG,
    }
    pod: dict[str, Any] = {
        "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": cache_claim_of(spec, owner.name)}}],
        # The image's own user (images/model-puller), declared so that the Pod meets the restricted Pod Security
        # level; fsGroup makes the claim writable for it.
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, "runAsNonRoot": True,
                            "runAsUser": PULLER_UID, "runAsGroup": PULLER_UID, "fsGroup": PULLER_UID},
    }
    # On the engines' nodes: a ReadWriteOnce claim binds where the engines will mount it.
    if node_selector := _node_selector(spec):
        pod["nodeSelector"] = node_selector
    if pod_tolerations := tolerations(spec):
        pod["tolerations"] = pod_tolerations
    return run_once_job(spec, owner, job_name(spec, owner.name, pull), COMPONENT, container, pod, {
        "backoffLimit": BACKOFF_LIMIT,
        "podFailurePolicy": {"rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_PERMANENT]}},
            # A drained or preempted node is no failure of the download.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]},
    })
