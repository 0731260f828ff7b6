"""Manifest builders: what a spec turns into, checked field by field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.render.manifests import (
    STARTUP_PROBE_BUDGET_SECONDS,
    Owner,
    children,
    deployment,
    endpoint,
    live_startup_budget,
    startup_budget_seconds,
)

OWNER = Owner("llama", "ai", "uid-1")
EXAMPLES = sorted(path for path in (Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")
                  if yaml.safe_load(path.read_text())["kind"] == "LLMDeployment")  # not keda-scaledobject.yaml


def spec(**overrides: Any) -> LLMDeploymentSpec:
    body: dict[str, Any] = {"model": {"name": "org/model"}, "accelerator": {"type": "nvidia", "count": 2}}
    body.update(overrides)
    return LLMDeploymentSpec.model_validate(body)


def child(one: LLMDeploymentSpec, kind: str) -> dict[str, Any] | None:
    (manifest,) = [m for (k, _name), m in children(one, OWNER).items() if k == kind]
    return manifest


def pod_spec(one: LLMDeploymentSpec) -> dict[str, Any]:
    return deployment(one, OWNER)["spec"]["template"]["spec"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_valid_specs(path: Path) -> None:
    manifest = yaml.safe_load(path.read_text())
    LLMDeploymentSpec.model_validate(manifest["spec"])


def test_gpu_resources_tolerations_and_product_selector() -> None:
    pod = pod_spec(spec(accelerator={"type": "nvidia", "count": 2, "product": "NVIDIA-H100-80GB-HBM3"}))
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_gaudi_resources_and_capability() -> None:
    pod = pod_spec(spec(accelerator={"type": "gaudi", "count": 8}))
    container = pod["containers"][0]
    assert container["resources"]["limits"]["habana.ai/gaudi"] == "8"
    assert container["securityContext"]["capabilities"]["add"] == ["SYS_NICE"]


@pytest.mark.parametrize(("choice", "resource"), [(None, "gpu.intel.com/i915"), ("xe", "gpu.intel.com/xe")])
def test_intel_gpu_resource_tolerations_product_and_image(choice: str | None, resource: str) -> None:
    accelerator = {"type": "intel-gpu", "count": 2, "product": "Max_1550"}
    if choice:
        accelerator["intelGpuResource"] = choice
    pod = pod_spec(spec(accelerator=accelerator))
    container = pod["containers"][0]
    assert container["resources"]["limits"] == container["resources"]["requests"] == {resource: "2"}
    for key in ("gpu.intel.com/i915", "gpu.intel.com/xe"):
        assert {"key": key, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"gpu.intel.com/product": "Max_1550"}
    assert container["image"] == "vllm/vllm-openai-xpu:v0.32.0"
    # The device plugin hands the cards to the container: no capability is added back.
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm"}


@pytest.mark.parametrize(("accelerator", "image"), [
    ({"type": "cpu"}, "opea/vllm-openvino:1.1"),
    ({"type": "intel-gpu"}, "opea/vllm-arc:latest"),
])
def test_openvino_backend_has_its_own_image_unless_one_is_given(accelerator: dict, image: str) -> None:
    openvino = {"backend": "openvino"}
    assert pod_spec(spec(accelerator=accelerator, engine=openvino))["containers"][0]["image"] == image
    mine = spec(accelerator=accelerator, engine={**openvino, "image": "registry.example.com/ov:1"})
    assert pod_spec(mine)["containers"][0]["image"] == "registry.example.com/ov:1"


def test_cpu_requests_no_accelerator_and_may_surge() -> None:
    manifest = deployment(spec(accelerator={"type": "cpu"}, resources={"requests": {"cpu": "4"}}), OWNER)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "4"}}
    assert "tolerations" not in manifest["spec"]["template"]["spec"]
    assert manifest["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "25%", "maxUnavailable": 0}


def test_accelerator_rollout_never_surges() -> None:
    assert deployment(spec(), OWNER)["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_probes_allow_long_loads_and_never_kill_a_loading_engine() -> None:
    container = pod_spec(spec())["containers"][0]
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["failureThreshold"] * container["livenessProbe"]["periodSeconds"] >= 60


def test_shm_cache_and_env() -> None:
    pod = pod_spec(spec(shmSize="16Gi"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "llama-cache"
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["HF_HOME"].startswith(mounts["cache"])
    assert env["VLLM_CACHE_ROOT"].startswith(mounts["cache"])


def test_retained_claim_has_no_owner_reference() -> None:
    kept = child(spec(), "PersistentVolumeClaim")
    assert kept is not None and "ownerReferences" not in kept["metadata"]
    dropped = child(spec(cache={"retainOnDelete": False}), "PersistentVolumeClaim")
    assert dropped is not None and dropped["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_existing_claim_is_mounted_not_created() -> None:
    one = spec(cache={"existingClaim": "shared-weights"})
    assert child(one, "PersistentVolumeClaim") is None
    volumes = {v["name"]: v for v in pod_spec(one)["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "shared-weights"


def test_pvc_model_mounted_read_only() -> None:
    pod = pod_spec(spec(model={"name": "pvc://weights/llama"}))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}


def test_disruption_budget_only_with_several_replicas() -> None:
    assert child(spec(replicas=1), "PodDisruptionBudget") is None
    budget = child(spec(replicas=3, cache={"accessMode": "ReadWriteMany"}), "PodDisruptionBudget")
    assert budget is not None and budget["spec"]["maxUnavailable"] == 1


def test_labels_and_owner_references_on_every_owned_child() -> None:
    several = spec(replicas=2, cache={"retainOnDelete": False, "accessMode": "ReadWriteMany"})
    across = spec(replicas=2, accelerator={"type": "nvidia", "count": 8, "nodesPerReplica": 2},
                  cache={"retainOnDelete": False, "accessMode": "ReadWriteMany"})
    rendered = [*children(several, OWNER).items(), *children(across, OWNER).items()]
    assert {kind for (kind, _), manifest in rendered if manifest is not None} == {
        "PersistentVolumeClaim", "Deployment", "LeaderWorkerSet", "Service", "PodDisruptionBudget"}
    for (kind, _name), manifest in rendered:
        if manifest is None:
            continue
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "vllm-operator"
        assert labels["app.kubernetes.io/instance"] == "llama"
        assert manifest["metadata"]["ownerReferences"][0]["controller"] is True


def test_pod_labels_cannot_override_the_selector() -> None:
    template = deployment(spec(podLabels={"llm.vllm-operator.io/llmdeployment": "other", "team": "a"}), OWNER)
    labels = template["spec"]["template"]["metadata"]["labels"]
    assert labels["llm.vllm-operator.io/llmdeployment"] == "llama" and labels["team"] == "a"


def test_endpoint_is_the_service_url() -> None:
    assert endpoint(spec(service={"port": 9000}), OWNER) == "http://llama.ai.svc.cluster.local:9000/v1"


def test_engine_pods_are_restricted_by_default() -> None:
    pod = pod_spec(spec())
    container = pod["containers"][0]
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_gaudi_adds_back_only_sys_nice() -> None:
    security = pod_spec(spec(accelerator={"type": "gaudi", "count": 8}))["containers"][0]["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_NICE"]}


def test_a_chosen_service_account_gets_its_token() -> None:
    assert pod_spec(spec(serviceAccountName="engine"))["automountServiceAccountToken"] is True


def test_a_rollout_is_not_stuck_while_the_engine_may_still_be_loading() -> None:
    for budget in (STARTUP_PROBE_BUDGET_SECONDS, 3000):
        assert deployment(spec(), OWNER, budget)["spec"]["progressDeadlineSeconds"] > budget


GIB = 2**30


@pytest.mark.parametrize(("accelerator", "weights", "budget"), [
    # 16 GB of Llama 3 8B on one H100: 15 min of compile and graphs + 16 GiB at 50 MiB/s (328 s) -> 1228 s -> 1230.
    ({"type": "nvidia", "count": 1}, 16 * GIB, 1230),
    # Llama 3 70B in bf16 over 8 Gaudi cards: 17.5 GiB each (358.4 s) + 45 min of HPU graph warm-up -> 3060 s.
    ({"type": "gaudi", "count": 8}, int(17.5 * GIB), 3060),
    # The tiny model on the CPU: 10 minutes of warm-up, and one more probe period for its megabyte.
    ({"type": "cpu"}, 2**20, 610),
    # 405B over 8 AMD GPUs, a byte count past any sense: the 4-hour ceiling.
    ({"type": "amd", "count": 8}, 4096 * GIB, 4 * 3600),
    # The size unknown: 40 minutes.
    ({"type": "nvidia", "count": 1}, None, 2400),
])
def test_the_startup_budget_follows_the_weights_and_the_accelerator(
        accelerator: dict[str, Any], weights: int | None, budget: int) -> None:
    tp = {"engine": {"tensorParallelSize": accelerator["count"]}} if accelerator.get("count", 1) > 1 else {}
    llmd = spec(accelerator=accelerator, **tp)
    assert startup_budget_seconds(llmd, weights) == budget
    probe = deployment(llmd, OWNER, budget)["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == budget
    assert live_startup_budget(deployment(llmd, OWNER, budget)) == budget


def test_a_deployment_without_an_engine_probe_has_no_live_budget() -> None:
    assert live_startup_budget(None) is None
    assert live_startup_budget({"spec": {"template": {"spec": {"containers": [{"name": "other"}]}}}}) is None


def test_credentials_may_come_from_secrets_and_shared_caches_allow_replicas() -> None:
    spec(engine={"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]})
    spec(replicas=4, cache={"accessMode": "ReadWriteMany"})
    spec(replicas=4, cache={"enabled": False})
    spec(replicas=4, cache={"existingClaim": "weights"})
