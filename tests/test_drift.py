"""Drift and ownership decisions, on plain manifests."""

from __future__ import annotations

import copy

from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.reconcile.drift import APPLIED_HASH, matches, owned, stamped
from vllm_operator.render.manifests import Owner, children

OWNER = Owner("llama", "ai", "uid-1")


def rendered(**spec: object) -> dict[tuple[str, str], dict]:
    body = {"model": {"name": "org/model"}, "accelerator": {"type": "nvidia", "count": 1}, **spec}
    return {k: stamped(m) for k, m in children(LLMDeploymentSpec.model_validate(body), OWNER).items() if m}


def live(manifest: dict) -> dict:
    """The object as the apiserver returns it: the manifest plus defaults and fields of others."""
    obj = copy.deepcopy(manifest)
    obj["metadata"].update(uid="child-uid", resourceVersion="7")
    obj["metadata"].setdefault("annotations", {})["deployment.kubernetes.io/revision"] = "1"
    obj["spec"]["defaulted"] = True
    return obj


def test_an_unchanged_spec_matches_its_live_children() -> None:
    for manifest in rendered(nodeSelector={"team": "a"}).values():
        assert matches(manifest, live(manifest))


def test_a_removed_field_is_drift() -> None:
    before = rendered(nodeSelector={"team": "a"}, podAnnotations={"a": "b"})[("Deployment", "llama")]
    after = rendered()[("Deployment", "llama")]
    # The new manifest is a subset of the old live object: comparing fields alone would see nothing.
    assert not matches(after, live(before))
    assert after["metadata"]["annotations"][APPLIED_HASH] != before["metadata"]["annotations"][APPLIED_HASH]


def test_only_the_controller_reference_makes_a_child_ours() -> None:
    deployment = rendered(cache={"retainOnDelete": False})[("Deployment", "llama")]
    assert owned(live(deployment), deployment, "uid-1")
    assert not owned(live(deployment), deployment, "uid-2")
    foreign = {"kind": "Deployment", "metadata": {"name": "llama", "labels": deployment["metadata"]["labels"]}}
    assert not owned(foreign, deployment, "uid-1"), "labels alone do not make a Deployment ours"


def test_a_retained_claim_with_our_labels_is_ours_and_a_bare_one_is_not() -> None:
    claim = rendered()[("PersistentVolumeClaim", "llama-cache")]
    assert "ownerReferences" not in claim["metadata"]
    assert owned(live(claim), claim, "uid-1")
    bare = {"kind": "PersistentVolumeClaim", "metadata": {"name": "llama-cache"}}
    assert not owned(bare, claim, "uid-1")


def engine_env(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"][0]["env"]


def test_an_entry_someone_else_added_to_a_list_keyed_by_name_is_no_drift() -> None:
    # `kubectl set env` adds a variable that the operator's server-side apply never removes (another manager owns
    # it): counted as drift, it made every reconcile of the LLMDeployment re-apply its Deployment and post an
    # "Updated" Event, with nothing changed (found by hack/devcluster/chaos.py's hand edits).
    deployment = rendered()[("Deployment", "llama")]
    edited = live(deployment)
    engine_env(edited).append({"name": "SOMEONE_ELSES", "value": "1"})
    assert matches(deployment, edited)


def test_a_changed_or_missing_entry_of_a_list_keyed_by_name_is_drift() -> None:
    deployment = rendered()[("Deployment", "llama")]
    changed = live(deployment)
    engine_env(changed)[0] = {**engine_env(changed)[0], "value": "changed by hand"}
    missing = live(deployment)
    del engine_env(missing)[0]
    assert not matches(deployment, changed)
    assert not matches(deployment, missing)
