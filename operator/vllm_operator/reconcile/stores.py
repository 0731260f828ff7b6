"""What the controller's stores keep of a watched object, and in what form.

Measured at 1,000 LLMDeployments with the bench's fleet: the children's stores were the largest
part of the operator's heap (15 MiB), and a Deployment's spec (its Pod template) was most of
each. A child is read in full once per reconcile of its LLMDeployment (drift, the startup
budget, the rollout), and only its kind, name, UID and controller on every scrape sweep; so a
child is kept as compressed JSON beside those four. Compressed against the first child of its
kind as zlib's preset dictionary, a Deployment's spec is 17 KB of dicts, 2.9 KB of JSON, 1.2 KB
compressed alone and 0.24 KB compressed against another model's Deployment; it decodes in under
0.1 ms.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

from vllm_operator.reconcile.drift import controller_uid
from vllm_operator.render.adapters import READINESS_GATE

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# Labels, keys, images and flags repeat across objects; long values (a status message) rarely do.
SHARED_STRING_LENGTH = 64
# Of a Pod's status: status.podIP is the engine's address; the rest of these nobody here reads.
POD_STATUS_UNREAD = ("hostIP", "hostIPs", "podIPs", "qosClass")
CONTAINER_STATUS_UNREAD = frozenset({"image", "imageID", "containerID", "volumeMounts", "resources",
                                     "allocatedResources", "allocatedResourcesStatus", "user", "stopSignal"})
# A Pod's conditions read here: Ready, why it is not scheduled, and when the adapters' gate opened. A running
# Pod has three more (Initialized, ContainersReady, PodReadyToStartContainers): a quarter of its size.
POD_CONDITIONS_READ = frozenset({"Ready", "PodScheduled", READINESS_GATE})


# zlib's preset dictionary, per kind: the first child of that kind packed. Children of one kind repeat most
# of each other (keys, labels, the Pod template), which a dictionary lets each refer to instead of carrying.
_DICTIONARIES: dict[str | None, bytes] = {}
MAX_DICTIONARY = 32 * 1024  # zlib's window: only its last 32 KiB can be referred to


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """All of a watched object but managedFields and kubectl's last-applied copy, sharing its short strings.

    Those two are most of an object's size and nothing here reads them. What is kept shares its
    short strings with every other stored object: a thousand Deployments repeat the same keys,
    image and flags.
    """
    return _shared(_unmanaged(body))


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """What reconcile and scrape read of a Pod: its metadata, its node, and its status without the addresses,
    images, mounts and conditions nothing here reads (half of a Pod's status)."""
    kept = _unmanaged(body)
    kept.pop("spec", None)
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
        status["conditions"] = [{k: v for k, v in c.items() if k != "lastProbeTime"} for c in status["conditions"]
                                if c.get("type") in POD_CONDITIONS_READ]
    kept["status"] = status
    return _shared(kept)


def _unmanaged(body: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of the object without managedFields and the last-applied annotation."""
    meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    annotations = meta.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return {**body, "metadata": meta}


def _shared(value: Any) -> Any:
    if isinstance(value, dict):
        return {sys.intern(k): _shared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared(v) for v in value]
    if isinstance(value, str) and len(value) <= SHARED_STRING_LENGTH:
        return sys.intern(value)
    return value


class PackedChild(Mapping[str, Any]):
    """A child as the stores keep it: ``slim``, packed (compact JSON, compressed) and decoded on each read (a new
    dict each time, so a reader cannot change the store). What every scrape sweep reads to find the engines'
    Pods, its kind, name, UID and controller, stays at hand as attributes."""

    __slots__ = ("kind", "name", "uid", "controller", "_dictionary", "_packed")

    def __init__(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        self.kind: str | None = body.get("kind")
        self.name: str = meta["name"]
        self.uid: str | None = meta.get("uid")
        self.controller = controller_uid(body)
        raw = json.dumps(_unmanaged(body), separators=(",", ":")).encode()
        self._dictionary = _DICTIONARIES.setdefault(self.kind, raw[-MAX_DICTIONARY:])
        packer = zlib.compressobj(1, zdict=self._dictionary)
        self._packed = packer.compress(raw) + packer.flush()

    def body(self) -> dict[str, Any]:
        unpacker = zlib.decompressobj(zdict=self._dictionary)
        return json.loads(unpacker.decompress(self._packed) + unpacker.flush())

    def __getitem__(self, key: str) -> Any:
        return self.body()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.body())

    def __len__(self) -> int:
        return len(self.body())

    def __bool__(self) -> bool:  # never empty: not worth decoding to tell
        return True

    def __repr__(self) -> str:
        return f"PackedChild({self.body()!r})"
