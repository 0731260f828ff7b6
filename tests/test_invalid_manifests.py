"""A catalog of wrong LLMDeployments: each is refused with a message a person understands.

Rules live twice (CEL in the CRD for the apiserver, pydantic for the operator), so each case is
checked against both: the real apiserver must reject it, and so must the models.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from vllm_operator import api

BASE: dict[str, Any] = {
    "apiVersion": f"{api.GROUP}/{api.VERSION}",
    "kind": api.KIND,
    "metadata": {"name": "bad"},
    "spec": {"model": {"name": "org/model"}, "accelerator": {"type": "nvidia", "count": 1}},
}


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        body = body.setdefault(part, {})
    body[leaf] = value


# (case id, {dotted path: value}, words the refusal must contain)
CATALOG: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-accelerator", {"spec.accelerator.type": "tpu"}, "Unsupported value"),
    ("memory-utilization-above-one", {"spec.engine.gpuMemoryUtilization": 1.5}, "less than or equal to 1"),
    ("memory-utilization-zero", {"spec.engine.gpuMemoryUtilization": 0}, "greater than 0"),
    ("tp-not-count", {"spec.accelerator.count": 4, "spec.engine.tensorParallelSize": 2}, "must equal accelerator.count"),
    ("cpu-with-gpu-count", {"spec.accelerator": {"type": "cpu", "count": 2}}, "remove it for type cpu"),
    ("removed-disable-log-requests", {"spec.engine.extraArgs": ["--disable-log-requests"]}, "--enable-log-requests"),
    ("removed-swap-space", {"spec.engine.extraArgs": ["--swap-space=4"]}, "--swap-space was removed"),
    ("removed-worker-use-ray", {"spec.engine.extraArgs": ["--worker-use-ray"]}, "distributedBackend: ray"),
    ("nodes-split-not-every-device", {"spec.accelerator": {"type": "nvidia", "count": 8, "nodesPerReplica": 2},
                                      "spec.engine.tensorParallelSize": 8, "spec.cache.accessMode": "ReadWriteMany"},
     "pipelineParallelSize = accelerator.nodesPerReplica"),
    ("nodes-pipeline-not-dividing", {"spec.accelerator": {"type": "nvidia", "count": 8, "nodesPerReplica": 2},
                                     "spec.engine.pipelineParallelSize": 3, "spec.cache.accessMode": "ReadWriteMany"},
     "must be a multiple of engine.pipelineParallelSize"),
    ("nodes-on-one-node-cache", {"spec.accelerator": {"type": "nvidia", "count": 8, "nodesPerReplica": 2}},
     "replicas that span nodes"),
    ("nodes-zero", {"spec.accelerator.nodesPerReplica": 0}, "greater than or equal to 1"),
    ("cpu-nodes-ranks-not-dividing", {"spec.accelerator": {"type": "cpu", "nodesPerReplica": 2},
                                      "spec.engine.tensorParallelSize": 3, "spec.cache.accessMode": "ReadWriteMany"},
     "multiple of accelerator.nodesPerReplica"),
    ("openvino-across-nodes", {"spec.accelerator": {"type": "cpu", "nodesPerReplica": 2},
                               "spec.engine.backend": "openvino", "spec.cache.accessMode": "ReadWriteMany"},
     "accelerator.nodesPerReplica"),
    ("unknown-distributed-backend", {"spec.engine.distributedBackend": "nccl"}, "Unsupported value"),
    ("owned-nnodes", {"spec.engine.extraArgs": ["--nnodes=2"]}, "use the spec fields"),
    ("owned-headless", {"spec.engine.extraArgs": ["--headless"]}, "use the spec fields"),
    ("owned-model-flag", {"spec.engine.extraArgs": ["--model=other/model"]}, "use the spec fields"),
    ("owned-tp-alias", {"spec.engine.extraArgs": ["-tp", "2"]}, "use the spec fields"),
    ("negative-replicas", {"spec.replicas": -1}, "greater than or equal to 0"),
    ("replicas-on-one-node-cache", {"spec.replicas": 2}, "cache.accessMode: ReadWriteMany"),
    ("replicas-on-one-pod-cache", {"spec.replicas": 3, "spec.cache.accessMode": "ReadWriteOncePod"},
     "cache.accessMode: ReadWriteMany"),
    ("literal-hf-token", {"spec.engine.env": [{"name": "HF_TOKEN", "value": "hf_abc"}]}, "must not have a literal"),
    ("literal-hub-token", {"spec.engine.env": [{"name": "HUGGING_FACE_HUB_TOKEN", "value": "x"}]},
     "must not have a literal"),
    ("literal-api-key", {"spec.engine.env": [{"name": "VLLM_API_KEY", "value": "sk"}]}, "must not have a literal"),
    ("node-selector-key-with-space", {"spec.nodeSelector": {"gpu type": "a100"}}, "nodeSelector keys must be label keys"),
    ("node-selector-key-two-slashes", {"spec.nodeSelector": {"a/b/c": "x"}}, "nodeSelector keys must be label keys"),
    ("node-selector-key-long-prefix", {"spec.nodeSelector": {"a" * 254 + "/x": "y"}},
     "nodeSelector keys must be label keys"),
    ("node-selector-value-with-space", {"spec.nodeSelector": {"gpu": "a 100"}}, "should match"),
    ("node-selector-value-too-long", {"spec.nodeSelector": {"gpu": "a" * 64}}, "63"),
    ("pod-label-key-uppercase-prefix", {"spec.podLabels": {"Example.com/team": "x"}}, "podLabels keys must be label keys"),
    ("pod-annotation-key-empty", {"spec.podAnnotations": {"": "x"}}, "podAnnotations keys must be label keys"),
    ("bad-shm-quantity", {"spec.shmSize": "8 gigs"}, "should match"),
    ("bad-cache-quantity", {"spec.cache.size": "lots"}, "should match"),
    ("bad-cpu-request", {"spec.resources": {"requests": {"cpu": "two"}}}, "should match"),
    ("pvc-without-claim", {"spec.model.name": "pvc://"}, "needs a claim name"),
    ("pvc-empty-claim", {"spec.model.name": "pvc:///weights"}, "needs a claim name"),
    ("http-model", {"spec.model.name": "https://example.com/model"}, "must be a Hugging Face repo id"),
    ("relative-file-model", {"spec.model.name": "file://models/x"}, "must be a Hugging Face repo id"),
    ("pattern-leaves-the-repo", {"spec.model.allowPatterns": ["../*"]}, "without '..'"),
    ("pattern-deep-parent", {"spec.model.ignorePatterns": ["a/../../b"]}, "without '..'"),
    ("pattern-absolute", {"spec.model.allowPatterns": ["/etc/*"]}, "should match"),
    ("no-patterns", {"spec.model.allowPatterns": []}, "at least 1 item"),
    ("two-chat-templates", {"spec.model.chatTemplate": "{{x}}",
                            "spec.model.chatTemplateConfigMapRef": {"name": "t", "key": "k"}}, "not both"),
    ("service-port-too-big", {"spec.service.port": 70000}, "less than or equal to 65535"),
    ("service-type", {"spec.service.type": "Ingress"}, "Unsupported value"),
    ("dtype", {"spec.engine.dtype": "fp4"}, "Unsupported value"),
    ("kv-cache-dtype", {"spec.engine.kvCacheDtype": "int3"}, "Unsupported value"),
    ("block-size", {"spec.engine.blockSize": 12}, "Unsupported value"),
    ("batched-tokens-below-seqs", {"spec.engine.maxNumSeqs": 256, "spec.engine.maxNumBatchedTokens": 128},
     "at least engine.maxNumSeqs"),
    ("cuda-graph-on-cpu", {"spec.accelerator": {"type": "cpu"}, "spec.engine.cudaGraph": {"mode": "FULL"}},
     "applies to GPU accelerators"),
    ("cpu-kv-cache-on-gpu", {"spec.engine.cpuKVCacheSpaceGiB": 4}, "applies to accelerator type cpu only"),
    ("product-on-gaudi", {"spec.accelerator": {"type": "gaudi", "product": "HL-225"}},
     "nvidia, amd and intel-gpu only"),
    ("intel-resource-on-nvidia", {"spec.accelerator.intelGpuResource": "xe"}, "applies to type intel-gpu only"),
    ("intel-resource-unknown", {"spec.accelerator": {"type": "intel-gpu", "intelGpuResource": "i965"}},
     "Unsupported value"),
    ("openvino-on-nvidia", {"spec.engine.backend": "openvino"}, "runs on accelerator types cpu and intel-gpu only"),
    ("openvino-lora", {"spec.accelerator": {"type": "cpu"}, "spec.engine": {
        "backend": "openvino", "maxLoras": 2}}, "does not support LoRA"),
    ("openvino-adapters", {"spec.accelerator": {"type": "cpu"}, "spec.engine": {"backend": "openvino"},
                           "spec.adapters": [{"name": "sql", "source": "file:///a/sql"}]}, "does not support LoRA"),
    ("lora-flag-in-extra-args", {"spec.engine.extraArgs": ["--enable-lora"]}, "use the spec fields"),
    ("lora-modules-in-extra-args", {"spec.engine.extraArgs": ["--lora-modules", "sql=/a/sql"]}, "use the spec fields"),
    ("adapter-of-unknown-source", {"spec.adapters": [{"name": "sql", "source": "s3://bucket/sql"}]},
     "adapters[].source must be"),
    ("adapter-from-hub-form", {"spec.adapters": [{"name": "sql", "source": "org/sql-lora"}]},
     "adapters[].source must be"),
    ("adapter-climbing-out", {"spec.adapters": [{"name": "sql", "source": "pvc://weights/../../etc"}]},
     "without '..'"),
    ("adapter-revision-off-the-hub", {"spec.adapters": [{"name": "sql", "source": "file:///a/sql", "revision": "v2"}]},
     "applies to adapters from the hub"),
    ("hub-adapter-without-cache", {"spec.cache.enabled": False,
                                   "spec.adapters": [{"name": "sql", "source": "hf://org/sql-lora"}]},
     "need the cache"),
    ("adapter-claim-root", {"spec.adapters": [{"name": "sql", "source": "pvc://weights"}]},
     "adapters[].source must be"),
    ("adapter-with-space", {"spec.adapters": [{"name": "sql", "source": "file:///a/my sql"}]}, "should match"),
    ("adapter-name-with-space", {"spec.adapters": [{"name": "my sql", "source": "file:///a/sql"}]}, "should match"),
    ("adapter-source-with-c1-control", {"spec.adapters": [{"name": "sql", "source": "file:///a/sql\x9b"}]},
     "should match"),
    ("served-name-with-escape-sequence", {"spec.model.servedName": "chat\x1b[31m"}, "should match"),
    ("revision-with-space", {"spec.model.revision": "main branch"}, "should match"),
    ("image-with-delete-character", {"spec.engine.image": "vllm/vllm-openai\x7f"}, "should match"),
    ("adapter-twice", {"spec.adapters": [{"name": "sql", "source": "file:///a/sql"},
                                         {"name": "sql", "source": "file:///b/sql"}]}, "Duplicate value"),
    ("adapter-takes-served-name", {"spec.model.servedName": "chat",
                                   "spec.adapters": [{"name": "chat", "source": "file:///a/chat"}]},
     "may not take the model's served name"),
    ("adapters-beyond-default-max-loras", {"spec.adapters": [
        {"name": f"a{i}", "source": f"file:///a/{i}"} for i in range(api.DEFAULT_MAX_LORAS + 1)]},
     "raise engine.maxLoras"),
    ("adapters-beyond-max-loras", {"spec.engine.maxLoras": 1, "spec.adapters": [
        {"name": "a", "source": "file:///a"}, {"name": "b", "source": "file:///b"}]}, "raise engine.maxLoras"),
    ("lora-rank-not-vllms", {"spec.engine.maxLoraRank": 24}, "Unsupported value"),
    ("openvino-tensor-parallel", {"spec.accelerator": {"type": "intel-gpu", "count": 2},
                                  "spec.engine.backend": "openvino"}, "does not support tensor or pipeline"),
    ("openvino-tp-on-cpu", {"spec.accelerator": {"type": "cpu"}, "spec.engine": {
        "backend": "openvino", "tensorParallelSize": 2}}, "does not support tensor or pipeline"),
    ("openvino-bfloat16", {"spec.accelerator": {"type": "cpu"}, "spec.engine": {
        "backend": "openvino", "dtype": "bfloat16"}}, "float32 only"),
    ("openvino-kv-cache-dtype", {"spec.accelerator": {"type": "cpu"}, "spec.engine": {
        "backend": "openvino", "kvCacheDtype": "fp8"}}, "use engine.openvino.kvCachePrecision"),
    ("openvino-block-size", {"spec.accelerator": {"type": "cpu"}, "spec.engine": {
        "backend": "openvino", "blockSize": 16}}, "picks its own"),
    ("openvino-settings-without-backend", {"spec.accelerator": {"type": "cpu"}, "spec.engine.openvino": {
        "kvCacheSpaceGiB": 8}}, "only with engine.backend: openvino"),
    ("openvino-cpu-kv-space", {"spec.accelerator": {"type": "cpu"}, "spec.engine": {
        "backend": "openvino", "cpuKVCacheSpaceGiB": 8}}, "use engine.openvino.kvCacheSpaceGiB"),
    ("openvino-u8-on-gpu", {"spec.accelerator": {"type": "intel-gpu"}, "spec.engine": {
        "backend": "openvino", "openvino": {"kvCachePrecision": "u8"}}}, "applies to accelerator type cpu only"),
    ("zero-accelerators", {"spec.accelerator.count": 0}, "greater than or equal to 1"),
    ("secret-ref-without-key", {"spec.apiKeySecretRef": {"name": "api"}}, "key"),
    ("pipeline-not-dividing", {"spec.accelerator.count": 8, "spec.engine.pipelineParallelSize": 3}, "multiple of"),
    ("existing-claim-with-size", {"spec.cache": {"existingClaim": "mine", "size": "10Gi"}}, "existingClaim"),
    ("missing-model", {"spec.model": None}, "model"),
    ("autoscaling-without-max", {"spec.autoscaling": {"minReplicas": 1}}, "maxReplicas"),
    ("autoscaling-on-one-node-cache", {"spec.autoscaling": {"maxReplicas": 4}}, "cache.accessMode: ReadWriteMany"),
    ("autoscaling-min-above-max", {"spec.autoscaling": {"minReplicas": 3, "maxReplicas": 2},
                                   "spec.cache.enabled": False}, "minReplicas must be at most"),
    ("autoscaling-max-too-big", {"spec.autoscaling": {"maxReplicas": 1001}, "spec.cache.enabled": False},
     "less than or equal to 1000"),
    ("autoscaling-no-targets", {"spec.autoscaling": {"maxReplicas": 1, "targets": []}}, "at least 1 item"),
    ("autoscaling-five-targets", {"spec.autoscaling": {"maxReplicas": 1, "targets": [
        {"metric": m, "value": 1} for m in ("requestsPerReplica", "waitingRequests", "kvCacheUsagePercent",
                                            "generationTokensPerSecond", "requestsPerReplica")]}},
     "must have at most 4 items"),
    ("autoscaling-duplicate-target", {"spec.autoscaling": {"maxReplicas": 1, "targets": [
        {"metric": "waitingRequests", "value": 4}, {"metric": "waitingRequests", "value": 8}]}},
     "each metric may appear once"),
    ("autoscaling-unknown-metric", {"spec.autoscaling": {"maxReplicas": 1, "targets": [
        {"metric": "gpuUtilization", "value": 80}]}}, "Unsupported value"),
    ("autoscaling-zero-target", {"spec.autoscaling": {"maxReplicas": 1, "targets": [
        {"metric": "requestsPerReplica", "value": 0}]}}, "greater than 0"),
    ("autoscaling-kv-above-100", {"spec.autoscaling": {"maxReplicas": 1, "targets": [
        {"metric": "kvCacheUsagePercent", "value": 120}]}}, "at most 100"),
    ("autoscaling-zero-without-delay", {"spec.autoscaling": {"minReplicas": 0, "maxReplicas": 1}},
     "needs behavior.scaleToZeroAfterSeconds"),
    ("autoscaling-delay-without-zero", {"spec.autoscaling": {"maxReplicas": 1,
                                                             "behavior": {"scaleToZeroAfterSeconds": 600}}},
     "applies only with minReplicas: 0"),
    ("autoscaling-zero-step", {"spec.autoscaling": {"maxReplicas": 1, "behavior": {"maxScaleUpStep": 0}}},
     "greater than or equal to 1"),
    ("autoscaling-step-not-percent", {"spec.autoscaling": {"maxReplicas": 1,
                                                           "behavior": {"maxScaleDownStep": "half"}}}, "should match"),
    ("autoscaling-negative-window", {"spec.autoscaling": {"maxReplicas": 1,
                                                          "behavior": {"scaleDownStabilizationSeconds": -1}}},
     "greater than or equal to 0"),
]

# (case id, {dotted path: value}): specs at the edges of the rules above that both must accept.
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("two-nodes-default-split", {"spec.accelerator": {"type": "nvidia", "count": 8, "nodesPerReplica": 2},
                                 "spec.cache.accessMode": "ReadWriteMany"}),
    ("two-gaudi-nodes-tp8-pp2-mp", {"spec.accelerator": {"type": "gaudi", "count": 8, "nodesPerReplica": 2},
                                    "spec.engine": {"tensorParallelSize": 8, "pipelineParallelSize": 2,
                                                    "distributedBackend": "mp"},
                                    "spec.cache.existingClaim": "shared-weights"}),
    ("cpu-two-nodes-pipeline", {"spec.accelerator": {"type": "cpu", "nodesPerReplica": 2},
                                "spec.engine.pipelineParallelSize": 2, "spec.cache.enabled": False}),
    ("intel-gpu-xe-tp4", {"spec.accelerator": {"type": "intel-gpu", "count": 4, "product": "Max_1550",
                                               "intelGpuResource": "xe"}, "spec.engine.tensorParallelSize": 4}),
    ("openvino-on-intel-gpu", {"spec.accelerator": {"type": "intel-gpu", "count": 1}, "spec.engine": {
        "backend": "openvino", "dtype": "float32", "tensorParallelSize": 1,
        "openvino": {"kvCacheSpaceGiB": 8, "enableQuantizedWeights": False}}}),
    ("openvino-on-cpu-every-field", {"spec.accelerator": {"type": "cpu"}, "spec.engine": {
        "backend": "openvino", "openvino": {"kvCacheSpaceGiB": 100, "kvCachePrecision": "u8",
                                            "enableQuantizedWeights": True},
        "enableChunkedPrefill": True, "maxNumBatchedTokens": 256}}),
    ("adapters-every-form", {"spec.engine": {"maxLoras": 3, "maxLoraRank": 64}, "spec.adapters": [
        {"name": "sql-v2", "source": "pvc://lora-weights/sql/v2"}, {"name": "org/chat.v1:latest",
                                                                  "source": "file:///opt/adapters/chat"},
        {"name": "bad-not-served", "source": "pvc://weights/a"}]}),
    ("adapters-from-the-hub", {"spec.adapters": [{"name": "sql", "source": "hf://org/sql-lora", "revision": "v1.2"},
                                                 {"name": "chat", "source": "hf://chat-lora"}]}),
    ("patterns-with-dots-and-folders", {"spec.model.allowPatterns": ["*.json", "onnx/..model.*", "sub/*.safetensors"],
                                        "spec.model.ignorePatterns": ["original/*", "*..bin"]}),
    ("labels-of-every-form", {
        "spec.nodeSelector": {"gpu": "", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "a" * 253 + "/" + "b" * 63:
                              "Z" * 63},
        "spec.podLabels": {"team": "ml_platform.v2"},
        "spec.podAnnotations": {"example.com/notes": "free text, with spaces: and / anything"}}),
    ("autoscaling-one-replica-on-one-node-cache", {"spec.autoscaling": {"maxReplicas": 1}}),
    ("autoscaling-defaults-with-shared-cache", {"spec.autoscaling": {"maxReplicas": 4},
                                                "spec.cache.accessMode": "ReadWriteMany"}),
    ("autoscaling-to-zero-every-field", {
        "spec.replicas": 0,
        "spec.cache": {"existingClaim": "weights"},
        "spec.autoscaling": {
            "minReplicas": 0, "maxReplicas": 8,
            "targets": [{"metric": "requestsPerReplica", "value": 32}, {"metric": "waitingRequests", "value": 2},
                        {"metric": "kvCacheUsagePercent", "value": 100}, {"metric": "generationTokensPerSecond",
                                                                           "value": 2500.5}],
            "behavior": {"scaleUpStabilizationSeconds": 15, "scaleDownStabilizationSeconds": 600,
                         "scaleDownDelaySeconds": 0, "scaleToZeroAfterSeconds": 1800,
                         "maxScaleUpStep": 4, "maxScaleDownStep": "50%"},
        },
    }),
]


def _manifest(changes: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(BASE)
    for path, value in changes.items():
        if value is None:
            *parents, leaf = path.split(".")
            target = body
            for part in parents:
                target = target[part]
            del target[leaf]
        else:
            _set(body, path, value)
    return body


def test_catalog_is_large() -> None:
    assert len(CATALOG) >= 25


@pytest.mark.parametrize(("case", "changes", "words"), CATALOG, ids=[c[0] for c in CATALOG])
def test_models_refuse(case: str, changes: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError):
        api.LLMDeploymentSpec.model_validate(_manifest(changes)["spec"])


@pytest.mark.parametrize(("case", "changes"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_models_accept(case: str, changes: dict[str, Any]) -> None:
    api.LLMDeploymentSpec.model_validate(_manifest(changes)["spec"])


@pytest.mark.cluster
@pytest.mark.parametrize(("case", "changes", "words"), CATALOG, ids=[c[0] for c in CATALOG])
def test_apiserver_refuses(crd_installed: None, cluster: Any, namespace: str, case: str,
                           changes: dict[str, Any], words: str) -> None:
    objects = client.CustomObjectsApi(cluster.api_client)
    with pytest.raises(ApiException) as refused:
        objects.create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, _manifest(changes), field_validation="Strict"
        )
    assert refused.value.status == 422, refused.value.body
    assert words in refused.value.body, refused.value.body


@pytest.mark.cluster
def test_apiserver_refuses_an_adapter_named_like_the_object(crd_installed: None, cluster: Any, namespace: str) -> None:
    """Without model.servedName the served name is metadata.name, which only a rule on the whole object sees; the
    operator's twin is api.adapter_name_clash, given the name."""
    body = _manifest({"spec.adapters": [{"name": "bad", "source": "file:///a/bad"}]})
    assert api.adapter_name_clash(api.LLMDeploymentSpec.model_validate(body["spec"]), "bad")
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(cluster.api_client).create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, body)
    assert api.ADAPTER_CLASH_MESSAGE in refused.value.body


@pytest.mark.cluster
def test_apiserver_refuses_a_name_too_long_for_groups_across_nodes(crd_installed: None, cluster: Any,
                                                                    namespace: str) -> None:
    """The LeaderWorkerSet's StatefulSets and Pods are named after the object: a rule on the whole object, and its
    twin api.name_too_long_across_nodes."""
    body = _manifest({"spec.accelerator": {"type": "nvidia", "count": 8, "nodesPerReplica": 2},
                      "spec.cache.accessMode": "ReadWriteMany"})
    body["metadata"]["name"] = "n" * 45
    assert api.name_too_long_across_nodes(api.LLMDeploymentSpec.model_validate(body["spec"]), body["metadata"]["name"])
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(cluster.api_client).create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, body)
    assert api.NODES_NAME_MESSAGE.split(": ")[0].split("1, ")[1] in refused.value.body  # JSON escapes ">"
    body["metadata"]["name"] = "n" * 44
    client.CustomObjectsApi(cluster.api_client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, body, dry_run="All")


@pytest.mark.cluster
@pytest.mark.parametrize(("name", "words"), [("1llama", "must start with a letter"), ("a" * 58, "at most 57")])
def test_apiserver_refuses_names_that_cannot_name_a_service(
    crd_installed: None, cluster: Any, namespace: str, name: str, words: str
) -> None:
    body = copy.deepcopy(BASE)
    body["metadata"]["name"] = name
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(cluster.api_client).create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, body
        )
    assert words in refused.value.body


@pytest.mark.cluster
def test_apiserver_refuses_unknown_fields(crd_installed: None, cluster: Any, namespace: str) -> None:
    body = _manifest({"spec.engine.maxModelLength": 4096})
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(cluster.api_client).create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, body, field_validation="Strict"
        )
    assert 'unknown field "spec.engine.maxModelLength"' in json.loads(refused.value.body)["message"]


@pytest.mark.cluster
def test_valid_base_is_accepted(crd_installed: None, cluster: Any, namespace: str) -> None:
    created = client.CustomObjectsApi(cluster.api_client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, copy.deepcopy(BASE), field_validation="Strict"
    )
    assert created["metadata"]["name"] == "bad"


@pytest.mark.cluster
@pytest.mark.parametrize(("case", "changes"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_apiserver_accepts(crd_installed: None, cluster: Any, namespace: str, case: str,
                           changes: dict[str, Any]) -> None:
    body = _manifest(changes)
    body["metadata"]["name"] = case[:57].rstrip("-")
    created = client.CustomObjectsApi(cluster.api_client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, body, field_validation="Strict"
    )
    assert created["spec"] == body["spec"]
