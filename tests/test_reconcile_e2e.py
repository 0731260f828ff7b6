"""The operator against the real apiserver, scheduler and controller manager: what `kubectl apply`
of an LLMDeployment leads to. Pods on the simulated nodes are run by kwok and their engines are
simulated, so these tests see scheduling and status exactly, without accelerators."""

from __future__ import annotations

import subprocess
import time

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import llmd
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from vllm_operator.render.manifests import cache_claim_name

pytestmark = pytest.mark.cluster

# Example manifest -> the nodes its engine Pods may land on.
EXAMPLE_NODES = {
    "llama3-8b-h100": {"gpu-h100-0", "gpu-h100-1", "gpu-h100-2"},
    "mistral-awq-hf-token": {"gpu-h100-0", "gpu-h100-1", "gpu-h100-2"},
    "mistral-7b-tp4": {"gpu-h100-0", "gpu-h100-1", "gpu-h100-2"},
    "llama3-70b-gaudi-tp8": {"gaudi-0", "gaudi-1"},
    "cpu-qwen": {"cpu-0"},
    "intel-gpu-qwen-tp2": {"intel-gpu-0"},
    "cpu-openvino": {"cpu-0"},
}


HOLD = "test.vllm-operator.io/hold"


def core(cluster: Cluster) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.api_client)


def apps(cluster: Cluster) -> client.AppsV1Api:
    return client.AppsV1Api(cluster.api_client)


def read_or_none(read, *args):  # type: ignore[no-untyped-def]
    try:
        return read(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def engine_args(cluster: Cluster, namespace: str, name: str) -> list[str]:
    deployment = apps(cluster).read_namespaced_deployment(name, namespace)
    return list(deployment.spec.template.spec.containers[0].args)


def small(manifest: dict, **spec: object) -> dict:
    """An example with a small cache, so tests do not pretend to fill the disk."""
    manifest["spec"].setdefault("cache", {})["size"] = "1Gi"
    manifest["spec"].update(spec)
    return manifest


@pytest.mark.parametrize("name", sorted(EXAMPLE_NODES))
def test_example_lands_on_its_accelerator_and_becomes_ready(
    operator: OperatorProcess, cluster: Cluster, namespace: str, name: str
) -> None:
    manifest = small(llmd.example(name))
    resource = manifest["metadata"]["name"]
    llmd.create(cluster.api_client, namespace, manifest)
    ready = llmd.wait_phase(cluster.api_client, namespace, resource, "Ready", 90)

    pods = llmd.owned_pods(cluster.api_client, namespace, resource)
    assert pods and {p.spec.node_name for p in pods} <= EXAMPLE_NODES[name]
    assert ready["status"]["ready"] == "1/1"
    scraped = wait_for("engine metrics in the status", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, resource)) and "engine" in obj["status"] and obj), 30)
    assert scraped["status"]["engine"]["scrapedReplicas"] == 1
    assert llmd.condition(ready, "Ready")["reason"] == "EngineReady"
    assert read_or_none(core(cluster).read_namespaced_service, resource, namespace) is not None
    claim = core(cluster).read_namespaced_persistent_volume_claim(cache_claim_name(resource), namespace)
    assert claim.metadata.labels["app.kubernetes.io/managed-by"] == "vllm-operator"
    listed = subprocess.run(["kubectl", "--kubeconfig", str(cluster.kubeconfig), "get", "llmdeployments", "-n", namespace],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    row = listed[1].split()
    accelerator = manifest["spec"]["accelerator"]["type"]
    assert row[:5] == [resource, manifest["spec"]["model"]["name"], accelerator, "1/1", "Ready"]


@pytest.mark.parametrize(("name", "image", "limits", "env", "flags"), [
    ("intel-gpu-qwen-tp2", "vllm/vllm-openai-xpu:v0.32.0", {"gpu.intel.com/i915": "2"}, {},
     ["--tensor-parallel-size", "2"]),
    ("cpu-openvino", "opea/vllm-openvino:1.1", {"memory": "160Gi"},
     {"VLLM_OPENVINO_DEVICE": "CPU", "VLLM_OPENVINO_KVCACHE_SPACE": "100",
      "VLLM_OPENVINO_CPU_KV_CACHE_PRECISION": "u8", "VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS": "ON"},
     ["--max-num-batched-tokens", "256", "--enable-chunked-prefill"]),
])
def test_intel_examples_run_with_their_image_resource_environment_and_flags(
    operator: OperatorProcess, cluster: Cluster, namespace: str, name: str, image: str, limits: dict,
    env: dict, flags: list[str],
) -> None:
    manifest = small(llmd.example(name))
    resource = manifest["metadata"]["name"]
    llmd.create(cluster.api_client, namespace, manifest)
    llmd.wait_phase(cluster.api_client, namespace, resource, "Ready", 90)
    [pod] = llmd.owned_pods(cluster.api_client, namespace, resource)
    container = pod.spec.containers[0]
    assert container.image == image
    assert container.resources.limits == limits
    assert env.items() <= {e.name: e.value for e in container.env}.items()
    assert " ".join(flags) in " ".join(container.args)


def test_spec_change_rolls_the_engine(operator: OperatorProcess, cluster: Cluster, namespace: str) -> None:
    llmd.create(cluster.api_client, namespace, small(llmd.example("llama3-8b-h100")))
    llmd.wait_phase(cluster.api_client, namespace, "llama-3-8b", "Ready", 90)
    before = {p.metadata.name for p in llmd.owned_pods(cluster.api_client, namespace, "llama-3-8b")}

    llmd.patch_spec(cluster.api_client, namespace, "llama-3-8b", {"engine": {"maxModelLen": 4096}})
    wait_for("--max-model-len 4096 in the Deployment",
             lambda: "4096" in engine_args(cluster, namespace, "llama-3-8b"), 30)
    args = engine_args(cluster, namespace, "llama-3-8b")
    assert args[args.index("--max-model-len") + 1] == "4096"
    # Ready for the new generation once the rollout is over: the old Pod serves until it is replaced.
    ready = wait_for("the rollout to complete", lambda: (
        (obj := llmd.wait_phase(cluster.api_client, namespace, "llama-3-8b", "Ready", 90))
        and llmd.condition(obj, "Progressing")["status"] == "False" and obj), 90)
    after = {p.metadata.name for p in llmd.owned_pods(cluster.api_client, namespace, "llama-3-8b")}
    assert after and not after & before, "the engine Pod was not replaced"
    assert ready["status"]["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in ready["status"]["conditions"])


def test_deleted_or_edited_children_are_restored(operator: OperatorProcess, cluster: Cluster, namespace: str) -> None:
    llmd.create(cluster.api_client, namespace, small(llmd.example("cpu-qwen")))
    llmd.wait_phase(cluster.api_client, namespace, "qwen-cpu", "Ready", 90)
    service = core(cluster).read_namespaced_service("qwen-cpu", namespace)

    core(cluster).delete_namespaced_service("qwen-cpu", namespace)
    recreated = wait_for("the Service to come back", lambda: (
        (s := read_or_none(core(cluster).read_namespaced_service, "qwen-cpu", namespace))
        and s.metadata.uid != service.metadata.uid and s), 30)
    assert recreated.spec.ports[0].port == 8000

    apps(cluster).patch_namespaced_deployment("qwen-cpu", namespace, {"spec": {"replicas": 3}})
    wait_for("the Deployment's replicas to be set back to 1",
             lambda: apps(cluster).read_namespaced_deployment("qwen-cpu", namespace).spec.replicas == 1, 30)


def test_delete_keeps_the_model_cache_unless_asked(operator: OperatorProcess, cluster: Cluster, namespace: str) -> None:
    kept = small(llmd.example("cpu-qwen"))
    dropped = small(llmd.example("cpu-qwen"))
    dropped["metadata"]["name"] = "qwen-scratch"
    dropped["spec"]["cache"]["retainOnDelete"] = False
    for manifest in (kept, dropped):
        llmd.create(cluster.api_client, namespace, manifest)
    for name in ("qwen-cpu", "qwen-scratch"):
        llmd.wait_phase(cluster.api_client, namespace, name, "Ready", 90)
        llmd.delete(cluster.api_client, namespace, name)

    def children_gone() -> bool:
        deployments = apps(cluster).list_namespaced_deployment(namespace).items
        services = core(cluster).list_namespaced_service(namespace).items
        pods = core(cluster).list_namespaced_pod(namespace).items
        return not deployments and not services and not pods

    wait_for("the garbage collector to remove Deployments, Services and Pods", children_gone, 60)
    wait_for("the claim of qwen-scratch to go", lambda: read_or_none(
        core(cluster).read_namespaced_persistent_volume_claim, cache_claim_name("qwen-scratch"), namespace) is None, 60)
    claim = core(cluster).read_namespaced_persistent_volume_claim(cache_claim_name("qwen-cpu"), namespace)
    assert claim.metadata.deletion_timestamp is None and not claim.metadata.owner_references


def test_more_gpus_than_a_node_has_is_reported_unschedulable(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = small(llmd.example("mistral-7b-tp4"))
    manifest["spec"]["accelerator"]["count"] = 9
    manifest["spec"]["engine"]["tensorParallelSize"] = 9
    llmd.create(cluster.api_client, namespace, manifest)
    pending = llmd.wait_phase(cluster.api_client, namespace, "mistral-7b", "Pending", 60)
    pending = wait_for("the Unschedulable condition", lambda: (
        (obj := llmd.get(cluster.api_client, namespace, "mistral-7b"))
        and (llmd.condition(obj, "Unschedulable") or {}).get("status") == "True" and obj), 30)
    unschedulable = llmd.condition(pending, "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in unschedulable["message"]
    assert llmd.condition(pending, "Ready")["reason"] == "Unschedulable"
    llmd.events_once(cluster.api_client, namespace, "mistral-7b", lambda events: any(
        e.reason == "Unschedulable" and e.type == "Warning" for e in events))


def test_a_flag_vllm_does_not_know_is_refused_at_admission_and_a_known_one_serves(
    operator: OperatorProcess, cluster: Cluster, namespace: str
) -> None:
    manifest = small(llmd.example("cpu-qwen"))
    manifest["spec"]["engine"]["extraArgs"] = ["--no-such-flag"]
    with pytest.raises(ApiException) as refused:
        llmd.create(cluster.api_client, namespace, manifest)
    assert refused.value.status == 422 and "does not have" in refused.value.body, refused.value.body
    assert "spec.engine.extraArgs" in refused.value.body
    assert read_or_none(apps(cluster).read_namespaced_deployment, "qwen-cpu", namespace) is None

    manifest["spec"]["engine"]["extraArgs"] = ["--enable-auto-tool-choice"]
    llmd.create(cluster.api_client, namespace, manifest)
    llmd.wait_phase(cluster.api_client, namespace, "qwen-cpu", "Ready", 90)
    assert operator.process is not None and operator.process.poll() is None


def test_a_namespace_being_deleted_is_left_to_go(operator: OperatorProcess, cluster: Cluster, namespace: str) -> None:
    manifest = small(llmd.example("cpu-qwen"))
    # Holds the LLMDeployment while the namespace controller deletes its children, as a slow
    # namespace deletion does with many of them.
    manifest["metadata"]["finalizers"] = [HOLD]
    llmd.create(cluster.api_client, namespace, manifest)
    llmd.wait_phase(cluster.api_client, namespace, "qwen-cpu", "Ready", 90)
    core(cluster).delete_namespace(namespace)
    wait_for("the namespace controller to delete the Deployment",
             lambda: not apps(cluster).list_namespaced_deployment(namespace).items, 60)
    messages: set[str] = set()
    deadline = time.monotonic() + 5  # several settle periods: time enough to try to bring the children back
    while time.monotonic() < deadline:
        status = (llmd.get(cluster.api_client, namespace, "qwen-cpu") or {}).get("status") or {}
        messages.update(c.get("message", "") for c in status.get("conditions") or [])
        time.sleep(0.2)
    llmd.patch_metadata(cluster.api_client, namespace, "qwen-cpu", {"finalizers": None})
    # Recreating a child fails in a terminating namespace; reporting that would be noise about a
    # deletion the user asked for.
    assert not [m for m in messages if "terminated" in m or "failed" in m], messages
    assert not apps(cluster).list_namespaced_deployment(namespace).items
