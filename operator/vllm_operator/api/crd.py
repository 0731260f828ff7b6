"""Generate the LLMDeployment CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema 2020-12; the apiserver wants a structural OpenAPI v3 schema. The
conversion inlines ``$ref``s, turns ``Optional[X]`` into X (absent is how Kubernetes spells null),
and rewrites the few keywords the two dialects spell differently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vllm_operator import api

CRD_FILE_NAME = f"{api.GROUP}_{api.PLURAL}.yaml"
# Service names are DNS-1035 labels of up to 63 characters; "-cache" is the longest suffix added.
MAX_NAME_LENGTH = 57

_DROPPED_KEYS = {"title", "default"}

PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Accel", "type": "string", "jsonPath": ".spec.accelerator.type"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Cache", "type": "number", "jsonPath": ".status.cache.percent",
     "description": "Percent of the model downloaded into the cache claim"},
    {"name": "Running", "type": "integer", "jsonPath": ".status.engine.requestsRunning",
     "description": "Requests being processed by the engines"},
    {"name": "Waiting", "type": "integer", "jsonPath": ".status.engine.requestsWaiting",
     "description": "Requests queued in the engines"},
    {"name": "KV%", "type": "number", "jsonPath": ".status.engine.kvCacheUsagePercent",
     "description": "Highest KV-cache use of any replica, in percent"},
    {"name": "Tok/s", "type": "number", "jsonPath": ".status.engine.generationTokensPerSecond",
     "description": "Generated tokens per second over all replicas"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
    {"name": "Count", "type": "integer", "jsonPath": ".spec.accelerator.count", "priority": 1,
     "description": "Accelerators per replica"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.autoscaling.desiredReplicas", "priority": 1,
     "description": "Replicas the built-in autoscaler asks for"},
    {"name": "Adapters", "type": "integer", "jsonPath": ".status.loadedAdapters", "priority": 1,
     "description": "LoRA adapters loaded in every running engine"},
]


def _to_openapi(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_to_openapi(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # the property's own description wins over the model's docstring
    variants = node.get("anyOf")
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) == 1:
            outer = {k: v for k, v in node.items() if k != "anyOf"}
            return _to_openapi({**non_null[0], **outer}, defs)
        node["anyOf"] = non_null
        if node.get("x-kubernetes-int-or-string"):
            # The one anyOf a structural schema allows; a pattern inside it would not be, and at
            # the outer level it applies to strings only.
            pattern = next((v["pattern"] for v in non_null if "pattern" in v), node.get("pattern"))
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if pattern:
                node["pattern"] = pattern
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(key), (int, float)) and not isinstance(node.get(key), bool):
            node["minimum" if key == "exclusiveMinimum" else "maximum"] = node[key]
            node[key] = True
    if node.get("additionalProperties") in (True, False):
        del node["additionalProperties"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or key == "$defs":
            continue
        if key == "properties":
            out[key] = {name: _to_openapi(prop, defs) for name, prop in value.items()}
        else:
            out[key] = _to_openapi(value, defs)
    if "properties" in out and "type" not in out:
        out["type"] = "object"
    return out


def openapi_schema(model: type[api.ApiModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)
    return _to_openapi(schema, schema.get("$defs", {}))


def crd() -> dict[str, Any]:
    root = {
        "type": "object",
        "description": (
            "LLMDeployment serves a large language model with vLLM's OpenAI-compatible server on NVIDIA or AMD "
            "GPUs, Intel Gaudi or CPUs, and reports the engines' load in its status."
        ),
        "required": ["spec"],
        "x-kubernetes-validations": [
            api.cel(
                f"self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                f"metadata.name must start with a letter, hold only lowercase letters, digits and '-', and be at "
                f"most {MAX_NAME_LENGTH} characters (it names the Service and the cache claim)",
            ),
            api.cel(api.ADAPTER_CLASH_RULE, api.ADAPTER_CLASH_MESSAGE),
            api.cel(api.NODES_NAME_RULE, api.NODES_NAME_MESSAGE),
        ],
        "properties": {
            "apiVersion": {"type": "string", "description": "Versioned schema of this object."},
            "kind": {"type": "string", "description": "REST resource this object represents."},
            "metadata": {"type": "object"},
            "spec": openapi_schema(api.LLMDeploymentSpec),
            "status": openapi_schema(api.LLMDeploymentStatus),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "vllm-operator", "app.kubernetes.io/part-of": "vllm-operator"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["all", "llm"],
            },
            "versions": [{
                "name": api.VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": {
                    "status": {},
                    "scale": {
                        "specReplicasPath": ".spec.replicas",
                        "statusReplicasPath": ".status.replicas",
                        "labelSelectorPath": ".status.selector",
                    },
                },
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


def render() -> str:
    header = "# Generated from vllm_operator/api/__init__.py by `make crds`; do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def crd_paths(repo_root: Path) -> list[Path]:
    """Every checked-in copy of the CRD: the top-level one and the Helm chart's."""
    return [repo_root / "crds" / CRD_FILE_NAME, repo_root / "charts" / "vllm-operator" / "crds" / CRD_FILE_NAME]


def write(repo_root: Path) -> list[Path]:
    text = render()
    paths = crd_paths(repo_root)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return paths
