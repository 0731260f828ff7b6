"""Does a live object still say what the operator applied, and is it the operator's at all?

Two kinds of drift. Someone else changed a field the operator sets: ``matches`` compares only the
fields the operator sets, so defaults the apiserver fills in and fields other controllers own never
count (quantities compare by value, "1Gi" == "1024Mi"). The spec changed, removals included: every
manifest carries a hash of itself (``stamped``), so a field the spec no longer renders changes the
hash, and the apply that follows lets server-side apply drop what this field manager owned and no
longer sends. An idle fleet matches on both counts and costs no writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from vllm_operator import api
from vllm_operator.kubeconfig import parse_quantity

APPLIED_HASH = f"{api.GROUP}/applied-hash"


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have:
        return True
    if isinstance(want, (str, int)) and isinstance(have, (str, int)) and not isinstance(want, bool):
        try:
            return parse_quantity(want) == parse_quantity(have)
        except ValueError:
            return False
    return False


def matches(want: Any, have: Any, path: str = "") -> bool:
    """True when every field in ``want`` has the same value in ``have``."""
    if isinstance(want, dict):
        return isinstance(have, Mapping) and all(matches(v, have.get(k), f"{path}.{k}") for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list):
            return False
        if path.endswith("metadata.ownerReferences"):
            # Other owners may be listed too; ours must be among them.
            return all(any(matches(w, h) for h in have) for w in want)
        if want and all(isinstance(w, dict) and "name" in w for w in want):
            # A list merged by name (containers, env, volumes, ports): an entry another manager added survives
            # every apply of ours, so it is no drift; each of ours must be there as we set it.
            by_name = {h.get("name"): h for h in have if isinstance(h, dict)}
            return all(w["name"] in by_name and matches(w, by_name[w["name"]], path) for w in want)
        return len(want) == len(have) and all(matches(w, h, path) for w, h in zip(want, have))
    return _same_scalar(want, have)


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def stamped(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with its own hash as an annotation; a changed spec, removals included, changes it."""
    meta = dict(manifest["metadata"])
    meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED_HASH: manifest_hash(manifest)}
    return {**manifest, "metadata": meta}


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """UID of the object's controller (the owner reference with ``controller: true``), if any."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def owned(obj: Mapping[str, Any], desired: Mapping[str, Any], owner_uid: str) -> bool:
    """Whether the operator may write ``obj``, the live object of the ``desired`` manifest.

    Only its controller reference says so. The one exception is a cache claim kept with
    ``cache.retainOnDelete``: it has no owner reference on purpose, so a claim with no controller
    that carries every label the operator gives it is the operator's, and a re-created
    LLMDeployment of the same name finds its downloaded weights again.
    """
    uid = controller_uid(obj)
    if uid is not None:
        return uid == owner_uid
    have = obj["metadata"].get("labels") or {}
    want = desired["metadata"].get("labels") or {}
    return desired["kind"] == "PersistentVolumeClaim" and all(have.get(k) == v for k, v in want.items())
