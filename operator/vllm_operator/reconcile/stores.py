"""What the controller's stores keep of a watched object, and in what form.

Measured at 1,000 LLMDeployments with the bench's fleet: the children's stores were the largest
part of the operator's heap (15 MiB), and a Deployment's spec (its Pod template) was most of
each. A child's spec and status are read once per reconcile of its LLMDeployment (drift, the
startup budget, the rollout), while its metadata is read on every scrape sweep; so a child keeps
those two as compressed JSON, a fourteenth of the decoded dicts (a Deployment: 17 KB of dicts,
2.9 KB of JSON, 1.3 KB compressed at level 1, which decodes in under 0.1 ms).
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# Labels, keys, images and flags repeat across objects; long values (a status message) rarely do.
SHARED_STRING_LENGTH = 64
# Of a Pod's status: status.podIP is the engine's address; the rest of these nobody here reads.
POD_STATUS_UNREAD = ("hostIP", "hostIPs", "podIPs", "qosClass")
CONTAINER_STATUS_UNREAD = frozenset({"image", "imageID", "containerID", "volumeMounts", "resources",
                                     "allocatedResources", "allocatedResourcesStatus", "user", "stopSignal"})
# What a child keeps packed: read once per reconcile of its LLMDeployment, not on every sweep.
PACKED = frozenset({"spec", "status"})


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """All of a watched object but managedFields and kubectl's last-applied copy, sharing its short strings.

    Those two are most of an object's size and nothing here reads them. What is kept shares its
    short strings with every other stored object: a thousand Deployments repeat the same keys,
    image and flags.
    """
    kept = _trimmed(body)
    if "spec" in body:
        kept["spec"] = body["spec"]
    return _shared(kept)


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """What reconcile and scrape read of a Pod: its metadata, its node, and its status without the addresses,
    images and mounts nothing here reads (a third of a Pod's status)."""
    kept = _trimmed(body)
    if node := (body.get("spec") or {}).get("nodeName"):
        kept["spec"] = {"nodeName": node}  # where a member of a group runs, for status.groups
    status = dict(body.get("status") or {})
    for unread in POD_STATUS_UNREAD:
        status.pop(unread, None)
    for containers in ("containerStatuses", "initContainerStatuses"):
        if containers in status:
            status[containers] = [{k: v for k, v in c.items() if k not in CONTAINER_STATUS_UNREAD}
                                  for c in status[containers]]
    if "conditions" in status:
        status["conditions"] = [{k: v for k, v in c.items() if k != "lastProbeTime"} for c in status["conditions"]]
    kept["status"] = status
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
    """A child as the stores keep it: ``slim``, with its spec and status packed (compact JSON, compressed) and
    decoded on each read of either (a new dict each time, so a reader cannot change the store). Its kind and
    metadata, which every scrape sweep reads to find the engines' Pods, stay as they are."""

    __slots__ = ("_fields", "_packed")

    def __init__(self, body: Mapping[str, Any]) -> None:
        fields = _trimmed(body)
        packed = {part: fields.pop(part) for part in PACKED if part in fields}
        if "spec" in body:
            packed["spec"] = body["spec"]
        self._fields: dict[str, Any] = _shared(fields)
        self._packed = zlib.compress(json.dumps(packed, separators=(",", ":")).encode(), 1) if packed else None

    def _unpacked(self) -> dict[str, Any]:
        return json.loads(zlib.decompress(self._packed)) if self._packed is not None else {}

    def __getitem__(self, key: str) -> Any:
        if key in PACKED:
            return self._unpacked()[key]
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._fields
        yield from self._unpacked()

    def __len__(self) -> int:
        return len(self._fields) + len(self._unpacked())

    def __repr__(self) -> str:
        return f"PackedChild({dict(self)!r})"
