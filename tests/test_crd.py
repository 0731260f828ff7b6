"""The CRD is generated from the pydantic models; checked-in copies must not drift."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import yaml

from vllm_operator.api import crd

REPO = Path(__file__).resolve().parents[1]


def _walk(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, prop in (schema.get("properties") or {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def _root() -> dict[str, Any]:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crds_match_the_models() -> None:
    expected = crd.render()
    for path in crd.crd_paths(REPO):
        assert path.exists(), f"{path} is missing: run `make crds`"
        assert path.read_text() == expected, f"{path} is out of date: run `make crds`"


def test_every_spec_and_status_field_is_described_for_kubectl_explain() -> None:
    root = _root()
    for top in ("spec", "status"):
        for path, node in _walk(root["properties"][top], top):
            if path.endswith("[]") or path.endswith("{}"):
                continue
            assert node.get("description"), f"{path} has no description"


def test_schema_is_structural() -> None:
    for path, node in _walk(_root(), ""):
        assert "$ref" not in node and "$defs" not in node, path
        assert node.get("additionalProperties") is not False, path
        int_or_string = node.get("x-kubernetes-int-or-string")
        assert "type" in node or int_or_string or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        for variant in node.get("anyOf") or []:
            assert int_or_string, f"{path}: anyOf is only allowed for int-or-string"
            assert variant.get("type") in ("integer", "string"), path


def test_printer_columns_and_subresources() -> None:
    version = crd.crd()["spec"]["versions"][0]
    names = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert names == ["Model", "Accel", "Ready", "Phase", "Cache", "Running", "Waiting", "KV%", "Tok/s", "Age"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]


def test_chart_and_top_level_copies_are_identical_yaml() -> None:
    first, second = (yaml.safe_load(p.read_text()) for p in crd.crd_paths(REPO))
    assert first == second
