"""examples/keda-scaledobject.yaml, the KEDA alternative to the built-in autoscaler: valid against KEDA's real
ScaledObject CRD (tests/data/keda, KEDA v2.20.2), aimed at the LLMDeployment's scale subresource, and reading
only series the operator exports, for that LLMDeployment, in valid PromQL."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from devcluster import binaries
from promql import metric_names
from vllm_operator import api
from vllm_operator.api import crd
from vllm_operator.engines.export import SERIES

Obj = dict[str, Any]
TESTS = Path(__file__).resolve().parent
KEDA_CRD = TESTS / "data" / "keda" / "keda.sh_scaledobjects.yaml"
EXAMPLE = TESTS.parent / "examples" / "keda-scaledobject.yaml"
# Trigger metadata keys the prometheus scaler of KEDA v2.20.2 reads (pkg/scalers/prometheus_scaler.go);
# the CRD itself leaves metadata free-form.
PROMETHEUS_KEYS = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold", "namespace",
                   "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout", "identityOwner"}
PROMETHEUS_REQUIRED = {"serverAddress", "query", "threshold"}
_SELECTOR = re.compile(r"\{([^{}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def _strict(node: Any) -> Any:
    """The schema as the apiserver applies it with field validation Strict: unknown fields are errors."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def _errors(scaled_object: Obj) -> list[str]:
    definition = yaml.safe_load(KEDA_CRD.read_text())
    [version] = [v for v in definition["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    found = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
             for e in jsonschema.Draft4Validator(schema).iter_errors(scaled_object)]
    spec = scaled_object.get("spec", {})
    # The CRD's one CEL rule, written out.
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        found.append("minReplicaCount must be less than or equal to maxReplicaCount")
    return found


def _example() -> Obj:
    manifest: Obj = yaml.safe_load(EXAMPLE.read_text())
    return manifest


def test_the_example_is_a_valid_scaled_object() -> None:
    assert _errors(_example()) == []


@pytest.mark.parametrize(("path", "value"), [
    ("spec.minReplicas", 1),  # a typo: KEDA spells it minReplicaCount
    ("spec.triggers.0.metadata.threshold", 16),  # metadata values are strings
    ("spec.triggers", []),
    ("spec.minReplicaCount", 5),  # above maxReplicaCount
])
def test_the_schema_check_catches_mistakes(path: str, value: Any) -> None:
    broken = copy.deepcopy(_example())
    *parents, leaf = path.split(".")
    node: Any = broken
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[leaf] = value
    assert _errors(broken)


def test_it_scales_the_llmdeployment_through_its_scale_subresource() -> None:
    target = _example()["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == (f"{api.GROUP}/{api.VERSION}", api.KIND)
    scale = crd.crd()["spec"]["versions"][0]["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.replicas" and scale["labelSelectorPath"] == ".status.selector"


def test_the_triggers_read_the_operator_series_of_that_llmdeployment() -> None:
    example = _example()
    wanted = {"namespace": example["metadata"]["namespace"], "llmdeployment": example["spec"]["scaleTargetRef"]["name"]}
    exported = {name for name, _help, _field in SERIES}
    read: set[str] = set()
    for trigger in example["spec"]["triggers"]:
        metadata = trigger["metadata"]
        assert trigger["type"] == "prometheus"
        assert PROMETHEUS_REQUIRED <= metadata.keys() <= PROMETHEUS_KEYS
        assert float(metadata["threshold"]) > 0
        names = metric_names(metadata["query"])
        assert names <= exported, names - exported
        read |= names
        selectors = _SELECTOR.findall(metadata["query"])
        assert len(selectors) == len(re.findall(r"vllm_operator_\w+", metadata["query"]))
        for selector in selectors:
            assert dict(_MATCHER.findall(selector)) == wanted, selector
    assert "vllm_operator_engine_requests_waiting" in read


def test_the_queries_are_valid_promql(tmp_path: Path) -> None:
    binaries.ensure((binaries.PROMETHEUS,))
    queries = [t["metadata"]["query"] for t in _example()["spec"]["triggers"]]
    rules = {"groups": [{"name": "keda", "rules": [{"record": f"keda:query_{i}", "expr": q}
                                                   for i, q in enumerate(queries)]}]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    result = subprocess.run([str(binaries.path_of("promtool")), "check", "rules", str(tmp_path / "queries.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
