"""The controller's stores keep only what reconcile and scrape read."""

from __future__ import annotations

from vllm_operator.controller import LAST_APPLIED, slim


def watched(kind: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {
            "name": "x",
            "namespace": "ns",
            "labels": {"a": "b"},
            "annotations": {LAST_APPLIED: "{...}", "keep": "me"},
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {"containers": []},
        "status": {"phase": "Running"},
    }


def test_slim_drops_managed_fields_and_last_applied_but_keeps_the_rest() -> None:
    body = watched("Deployment")
    kept = slim(body)
    assert kept == {
        "apiVersion": "v1",
        "kind": "Deployment",
        "metadata": {"name": "x", "namespace": "ns", "labels": {"a": "b"}, "annotations": {"keep": "me"}},
        "spec": {"containers": []},
        "status": {"phase": "Running"},
    }
    # The watched body itself is left as it was: kopf may still hold it.
    assert "managedFields" in body["metadata"] and LAST_APPLIED in body["metadata"]["annotations"]


def test_slim_can_drop_a_pods_spec() -> None:
    kept = slim(watched("Pod"), keep_spec=False)
    assert "spec" not in kept and kept["status"] == {"phase": "Running"}
