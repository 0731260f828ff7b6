"""What the controller's stores keep of a watched object, and in what form.

Measured at 1,000 LLMDeployments with the bench's fleet: the children's stores were the largest
part of the operator's heap (15 MiB), and a Deployment's spec (its Pod template) was most of
each. A spec is read once per reconcile of its LLMDeployment (drift, the startup budget), while
a child's metadata and status are read on every scrape sweep; so a child keeps its spec as
compact JSON, a sixth of the size of the decoded dicts, and decodes it when read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from typing import Any

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# Labels, keys, images and flags repeat across objects; long values (a status message) rarely do.
SHARED_STRING_LENGTH = 64


def slim(body: Mapping[str, Any], keep_spec: bool = True) -> dict[str, Any]:
    """All of a watched object but managedFields and kubectl's last-applied copy, sharing its short strings.

    Those two, and a Pod's spec, are most of an object's size and nothing here reads them. What is
    kept shares its short strings with every other stored object: a thousand Deployments repeat
    the same keys, image and flags.
    """
    kept = _trimmed(body)
    if keep_spec and "spec" in body:
        kept["spec"] = body["spec"]
    elif node := (body.get("spec") or {}).get("nodeName"):
        kept["spec"] = {"nodeName": node}  # where a member of a group runs, for status.groups
    return _shared(kept)


def _trimmed(body: Mapping[str, Any]) -> dict[str, Any]:
    """The object without its spec, managedFields and last-applied annotation."""
    meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    annotations = meta.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    kept = {k: v for k, v in body.items() if k != "spec"}
    kept["metadata"] = meta
    return kept


def _shared(value: Any) -> Any:
    if isinstance(value, dict):
        return {sys.intern(k): _shared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared(v) for v in value]
    if isinstance(value, str) and len(value) <= SHARED_STRING_LENGTH:
        return sys.intern(value)
    return value


class PackedChild(Mapping[str, Any]):
    """A child as the stores keep it: ``slim`` but with its spec as compact JSON, decoded on each read of
    ``["spec"]`` (a new dict each time, so a reader cannot change the store)."""

    __slots__ = ("_fields", "_spec")

    def __init__(self, body: Mapping[str, Any]) -> None:
        self._fields: dict[str, Any] = _shared(_trimmed(body))
        spec = body.get("spec")
        self._spec = None if spec is None else json.dumps(spec, separators=(",", ":")).encode()

    def __getitem__(self, key: str) -> Any:
        if key == "spec" and self._spec is not None:
            return json.loads(self._spec)
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._fields
        if self._spec is not None:
            yield "spec"

    def __len__(self) -> int:
        return len(self._fields) + (self._spec is not None)

    def __repr__(self) -> str:
        return f"PackedChild({dict(self)!r})"
