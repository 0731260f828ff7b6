"""Pure builders of the objects an LLMDeployment owns: Deployment, Service, cache PVC and PDB."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from vllm_operator import api
from vllm_operator.api import LLMDeploymentSpec, lora_enabled, parse_model_source
from vllm_operator.render.adapters import READINESS_GATE, adapter_volumes
from vllm_operator.render.engine_args import (
    CACHE_MOUNT,
    CHAT_TEMPLATE_MOUNT,
    ENGINE_PORT,
    MODEL_MOUNT,
    engine_container,
    engine_image,
)
from vllm_operator.render import multinode
from vllm_operator.render.profiles import device_resource, profile_for

Manifest = dict[str, Any]

SELECTOR_LABEL = f"{api.GROUP}/llmdeployment"
ENGINE_CONTAINER = "vllm"
# The Pods of a replica across nodes other than its leader: no API server, not scraped, not routed to.
WORKER_COMPONENT = "engine-worker"
MANAGED_BY = "vllm-operator"
DEFAULT_CACHE_SIZE = "50Gi"
# The startup probe's budget when the weights' size is unknown: a large model can take tens of minutes.
STARTUP_PROBE_BUDGET_SECONDS = 40 * 60
STARTUP_PROBE_PERIOD_SECONDS = 10
MAX_STARTUP_BUDGET_SECONDS = 4 * 60 * 60
# Each device reads its share of the weights at this rate at least, from a network volume.
WEIGHT_LOAD_BYTES_PER_SECOND = 50 * 2**20
# A rollout counts as stuck only after the engine had its whole startup budget, plus time to be
# scheduled and to pull the image: a model still loading at minute 11 is not a failed rollout.
PROGRESS_MARGIN_SECONDS = 10 * 60


@dataclass(frozen=True)
class Owner:
    """The LLMDeployment the children belong to."""

    name: str
    namespace: str
    uid: str

    @property
    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{api.GROUP}/{api.VERSION}",
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def selector_labels(name: str) -> dict[str, str]:
    return {SELECTOR_LABEL: name}


def serving_selector(spec: LLMDeploymentSpec, name: str) -> dict[str, str]:
    """The Pods that serve the API: every engine Pod, or across nodes the group leaders only."""
    if spec.accelerator.nodes > 1:
        return {**selector_labels(name), multinode.WORKER_INDEX_LABEL: "0"}
    return selector_labels(name)


def common_labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **selector_labels(name),
    }


def cache_claim_name(owner_name: str) -> str:
    return f"{owner_name}-cache"


def _metadata(owner: Owner, name: str, component: str, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": owner.namespace, "labels": common_labels(owner.name, component)}
    if owned:
        meta["ownerReferences"] = [owner.reference]
    return meta


def _resources(spec: LLMDeploymentSpec) -> dict[str, Any]:
    requests = {k: str(v) for k, v in spec.resources.requests.items()}
    limits = {k: str(v) for k, v in spec.resources.limits.items()}
    resource_name = device_resource(spec.accelerator.type, spec.accelerator.intel_gpu_resource)
    if resource_name is not None:
        # Extended resources must have requests equal to limits.
        requests[resource_name] = limits[resource_name] = str(spec.accelerator.devices)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def engine_volumes(spec: LLMDeploymentSpec, owner: Owner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cache_claim = spec.cache.existing_claim or cache_claim_name(owner.name)
    volumes: list[dict[str, Any]] = [
        {"name": "cache", "persistentVolumeClaim": {"claimName": cache_claim}}
        if spec.cache.enabled
        else {"name": "cache", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.shm_size)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "cache", "mountPath": CACHE_MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    kind, claim, _path = parse_model_source(spec.model.name)
    if kind == "pvc":
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    template_ref = spec.model.chat_template_config_map_ref
    if template_ref is not None:
        volumes.append({
            "name": "chat-template",
            "configMap": {"name": template_ref.name, "items": [{"key": template_ref.key, "path": template_ref.key}]},
        })
        mounts.append({"name": "chat-template", "mountPath": CHAT_TEMPLATE_MOUNT, "readOnly": True})
    lora_volumes, lora_mounts = adapter_volumes(spec)
    return volumes + lora_volumes, mounts + lora_mounts


def startup_budget_seconds(spec: LLMDeploymentSpec, weight_bytes_per_device: int | None) -> int:
    """Seconds the startup probe waits for an engine: the accelerator's compile and warm-up time plus reading
    each device's share of the weights, or 40 minutes when their size is unknown."""
    if weight_bytes_per_device is None:
        return STARTUP_PROBE_BUDGET_SECONDS
    seconds = profile_for(spec.accelerator.type).startup_seconds + weight_bytes_per_device / WEIGHT_LOAD_BYTES_PER_SECOND
    periods = math.ceil(seconds / STARTUP_PROBE_PERIOD_SECONDS)
    return min(periods * STARTUP_PROBE_PERIOD_SECONDS, MAX_STARTUP_BUDGET_SECONDS)


def live_startup_budget(workload: Mapping[str, Any] | None) -> int | None:
    """The startup budget of a live engine Deployment or LeaderWorkerSet (its leaders'), so that a size the
    operator cannot learn now (the hub does not answer) keeps the budget it had rather than restarting every
    engine with another."""
    spec = (workload or {}).get("spec") or {}
    template = (spec.get("leaderWorkerTemplate") or {}).get("leaderTemplate") or spec.get("template") or {}
    containers = (template.get("spec") or {}).get("containers") or []
    for container in containers:
        probe = container.get("startupProbe") if container.get("name") == ENGINE_CONTAINER else None
        if probe and isinstance(probe.get("periodSeconds"), int) and isinstance(probe.get("failureThreshold"), int):
            return int(probe["periodSeconds"] * probe["failureThreshold"])
    return None


def _probe(period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def engine_container_manifest(spec: LLMDeploymentSpec, owner: Owner, mounts: list[dict[str, Any]],
                              startup_budget: int) -> dict[str, Any]:
    profile = profile_for(spec.accelerator.type)
    engine = engine_container(spec, owner.name)
    container: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": engine_image(spec),
        "imagePullPolicy": spec.engine.image_pull_policy or "IfNotPresent",
        "command": list(engine.command),
        "args": list(engine.args),
        "env": list(engine.env),
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
        # Liveness and readiness only start once the startup probe passed, so a loading engine is never killed.
        "startupProbe": _probe(STARTUP_PROBE_PERIOD_SECONDS, math.ceil(startup_budget / STARTUP_PROBE_PERIOD_SECONDS)),
        "readinessProbe": _probe(5, 3),
        "livenessProbe": _probe(15, 4),
        # A crashed engine's last log lines become its termination message, and so reach Degraded.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(profile.capabilities),
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    return container


def _container_security(capabilities: tuple[str, ...]) -> dict[str, Any]:
    """Restricted by default; a profile adds back only the capabilities its runtime needs."""
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if capabilities:
        caps["add"] = list(capabilities)
    return {"allowPrivilegeEscalation": False, "capabilities": caps}


def run_once_job(spec: LLMDeploymentSpec, owner: Owner, name: str, component: str, container: Manifest,
                 pod: Manifest, job: Manifest, annotations: Mapping[str, str] | None = None) -> Manifest:
    """A Job of the LLMDeployment's that runs one container once (a download, a benchmark): owned by it,
    labelled as its children are, restricted, without service links or an API token. ``pod`` and ``job`` add
    to the Pod and Job specs; the container reports through its termination message."""
    labels = common_labels(owner.name, component)
    pod_spec: dict[str, Any] = {
        "containers": [{**container, "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": _container_security(())}],
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        **pod,
    }
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    if lora_enabled(spec):
        pod_spec["readinessGates"] = [{"conditionType": READINESS_GATE}]
    metadata: dict[str, Any] = {"name": name, "namespace": owner.namespace, "labels": labels,
                                "ownerReferences": [owner.reference]}
    template: dict[str, Any] = {"labels": labels}
    if annotations:
        metadata["annotations"] = template["annotations"] = dict(annotations)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
            "spec": {**job, "template": {"metadata": template, "spec": pod_spec}}}


def _node_selector(spec: LLMDeploymentSpec) -> dict[str, str]:
    profile = profile_for(spec.accelerator.type)
    selector = dict(profile.node_selector)
    if spec.accelerator.product is not None and profile.product_label is not None:
        selector[profile.product_label] = spec.accelerator.product
    selector.update(spec.node_selector)
    return selector


def tolerations(spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    """The accelerator profile's tolerations, then the spec's."""
    return [dict(t) for t in profile_for(spec.accelerator.type).tolerations] + [
        t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations
    ]


def engine_pod_template(spec: LLMDeploymentSpec, owner: Owner, container: Manifest, volumes: list[Manifest],
                        component: str = "engine") -> Manifest:
    """The Pod template of an engine Pod around ``container``: placement, identity and volumes from the spec."""
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 60,
        "enableServiceLinks": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        # The engine never calls the Kubernetes API; a token is mounted only for a ServiceAccount the user chose.
        "automountServiceAccountToken": spec.service_account_name is not None,
    }
    if node_selector := _node_selector(spec):
        pod_spec["nodeSelector"] = node_selector
    if pod_tolerations := tolerations(spec):
        pod_spec["tolerations"] = pod_tolerations
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    if lora_enabled(spec) and component == "engine":
        pod_spec["readinessGates"] = [{"conditionType": READINESS_GATE}]
    template_meta: dict[str, Any] = {"labels": {**spec.pod_labels, **common_labels(owner.name, component)}}
    if spec.pod_annotations:
        template_meta["annotations"] = dict(spec.pod_annotations)
    return {"metadata": template_meta, "spec": pod_spec}


def deployment(spec: LLMDeploymentSpec, owner: Owner, startup_budget: int = STARTUP_PROBE_BUDGET_SECONDS) -> Manifest:
    """The engine Deployment; ``startup_budget`` from ``startup_budget_seconds``."""
    profile = profile_for(spec.accelerator.type)
    volumes, mounts = engine_volumes(spec, owner)
    template = engine_pod_template(spec, owner, engine_container_manifest(spec, owner, mounts, startup_budget), volumes)
    # Scarce devices: replace a replica in place rather than asking for more accelerators than replicas hold.
    strategy = (
        {"maxSurge": 0, "maxUnavailable": 1} if profile.scarce else {"maxSurge": "25%", "maxUnavailable": 0}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, owner.name, "engine"),
        "spec": {
            "replicas": spec.replicas,
            "progressDeadlineSeconds": startup_budget + PROGRESS_MARGIN_SECONDS,
            "selector": {"matchLabels": selector_labels(owner.name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": strategy},
            "template": template,
        },
    }


def leader_worker_set(spec: LLMDeploymentSpec, owner: Owner,
                      startup_budget: int = STARTUP_PROBE_BUDGET_SECONDS) -> Manifest:
    """The engine LeaderWorkerSet of a model across ``accelerator.nodesPerReplica`` nodes: one group of that many
    Pods per replica, created, placed and restarted as one (a lost worker restarts its group: vLLM cannot take a
    rank back)."""
    volumes, mounts = engine_volumes(spec, owner)
    leader, worker = multinode.group_containers(spec, engine_container_manifest(spec, owner, mounts, startup_budget))
    scarce = profile_for(spec.accelerator.type).scarce
    return {
        "apiVersion": multinode.API_VERSION,
        "kind": multinode.KIND,
        "metadata": _metadata(owner, multinode.lws_name(owner.name), "engine"),
        "spec": {
            "replicas": spec.replicas,
            # The workers start with the leader, not once it is Ready: it is Ready only after they joined.
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate", "rollingUpdateConfiguration": (
                {"maxUnavailable": 1, "maxSurge": 0} if scarce else {"maxUnavailable": 0, "maxSurge": 1})},
            "leaderWorkerTemplate": {
                "size": spec.accelerator.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": engine_pod_template(spec, owner, leader, volumes),
                "workerTemplate": engine_pod_template(spec, owner, worker, volumes, WORKER_COMPONENT),
            },
        },
    }


def service(spec: LLMDeploymentSpec, owner: Owner) -> Manifest:
    metadata = _metadata(owner, owner.name, "api")
    if spec.service.annotations:
        metadata["annotations"] = dict(spec.service.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": spec.service.type,
            "selector": serving_selector(spec, owner.name),
            "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def cache_claim(spec: LLMDeploymentSpec, owner: Owner) -> Manifest | None:
    """The model cache PVC the operator creates; None when disabled or the user brings a claim."""
    cache = spec.cache
    if not cache.enabled or cache.existing_claim:
        return None
    claim_spec: dict[str, Any] = {
        "accessModes": [cache.access_mode or "ReadWriteOnce"],
        "resources": {"requests": {"storage": str(cache.size or DEFAULT_CACHE_SIZE)}},
    }
    if cache.storage_class_name:
        claim_spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        # Without an owner reference the garbage collector leaves the weights alone.
        "metadata": _metadata(owner, cache_claim_name(owner.name), "model-cache", owned=not cache.retain_on_delete),
        "spec": claim_spec,
    }


def disruption_budget(spec: LLMDeploymentSpec, owner: Owner) -> Manifest | None:
    if spec.replicas < 2:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, owner.name, "engine"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(owner.name)}},
    }


def endpoint(spec: LLMDeploymentSpec, owner: Owner) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc.cluster.local:{spec.service.port}/v1"


ChildKey = tuple[str, str]  # (kind, name)


def engine_keys(owner_name: str) -> tuple[ChildKey, ChildKey]:
    """The children that run the engines, of which a spec renders one: the Deployment (one Pod per replica) and
    the LeaderWorkerSet (a group of Pods across nodes per replica)."""
    return ("Deployment", owner_name), (multinode.KIND, multinode.lws_name(owner_name))


def children(spec: LLMDeploymentSpec, owner: Owner,
             startup_budget: int = STARTUP_PROBE_BUDGET_SECONDS) -> dict[ChildKey, Manifest | None]:
    """Every child by kind and name; None means the child must not exist for this spec."""
    across_nodes = spec.accelerator.nodes > 1
    one_node, groups = engine_keys(owner.name)
    return {
        ("PersistentVolumeClaim", cache_claim_name(owner.name)): cache_claim(spec, owner),
        one_node: None if across_nodes else deployment(spec, owner, startup_budget),
        groups: leader_worker_set(spec, owner, startup_budget) if across_nodes else None,
        ("Service", owner.name): service(spec, owner),
        ("PodDisruptionBudget", owner.name): disruption_budget(spec, owner),
    }
