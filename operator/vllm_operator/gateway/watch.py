"""What the gateway knows of the cluster: the LLMDeployments, their Ready engine Pods, their API keys.

Two watches (LLMDeployments, engine Pods) per watched namespace, or one each cluster-wide, keep a
``Fleet`` current through the operator's own apiserver client. The replica load the gateway balances on
comes from status.engine, which the operator already scrapes: the gateway never scrapes an engine.
A request for an LLMDeployment at zero replicas wakes it: one scale-up through the scale subresource,
shared by every request that arrives while it loads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from vllm_operator import api
from vllm_operator.kube import Kube, KubeError, SecretKeys
from vllm_operator.render.engine_args import ENGINE_PORT
from vllm_operator.render.manifests import SELECTOR_LABEL

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, LLMDeployment name)

# A watch ends after this long and starts again from where it was: a dead connection is noticed by then.
WATCH_SECONDS = 300
# Seconds between attempts after the apiserver refused or dropped a list or watch.
RELIST_DELAY = 1.0
# Engine Pods only: benchmark and model-puller Pods carry the LLMDeployment's label too.
ENGINE_PODS = f"{SELECTOR_LABEL},app.kubernetes.io/component=engine"


@dataclass(frozen=True, slots=True)
class Served:
    """One LLMDeployment as the gateway routes to it."""

    namespace: str
    name: str
    model: str  # the name clients ask for
    created: str  # metadata.creationTimestamp: the oldest wins a served name that two LLMDeployments claim
    replicas: int  # spec.replicas
    phase: str | None
    strategy: str  # spec.routing.strategy
    api_key_ref: tuple[str, str] | None  # (Secret, key) of spec.apiKeySecretRef
    waiting: int = 0  # status.engine.requestsWaiting, over all replicas
    kv_cache_percent: float = 0.0  # status.engine.kvCacheUsagePercent, the fullest replica
    adapters: tuple[str, ...] = ()  # LoRA adapters of spec.adapters that engines have loaded

    @property
    def key(self) -> Key:
        return self.namespace, self.name


def served_from(obj: Mapping[str, Any]) -> Served:
    """The routing view of an LLMDeployment object (as the apiserver returns it)."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    engine = status.get("engine") or {}
    ref = spec.get("apiKeySecretRef")
    # A Ready engine had every adapter before it took traffic (its readiness gate); one just added to the spec
    # is routed once some engine has it.
    listed = {adapter.get("name") for adapter in spec.get("adapters") or []}
    loaded = tuple(a["name"] for a in status.get("adapters") or [] if a.get("name") in listed
                   and int(a.get("loadedReplicas") or 0) > 0)
    return Served(
        namespace=meta["namespace"],
        name=meta["name"],
        model=(spec.get("model") or {}).get("servedName") or meta["name"],
        created=meta.get("creationTimestamp") or "",
        replicas=int(spec.get("replicas", 1)),
        phase=status.get("phase"),
        strategy=(spec.get("routing") or {}).get("strategy") or "LeastLoad",
        api_key_ref=(ref["name"], ref["key"]) if ref else None,
        waiting=int(engine.get("requestsWaiting") or 0),
        kv_cache_percent=float(engine.get("kvCacheUsagePercent") or 0.0),
        adapters=loaded,
    )


def model_index(deployments: Iterable[Served]) -> dict[str, Served]:
    """Model name -> the LLMDeployment that serves it: its served name, or one of its loaded adapters.

    Two LLMDeployments serving one name (in two namespaces): the oldest keeps it, as a Service would; a served
    name wins over an adapter of the same name elsewhere.
    """
    ordered = sorted(deployments, key=lambda s: (s.created, s.namespace, s.name))
    index: dict[str, Served] = {}
    for served in ordered:
        index.setdefault(served.model, served)
    for served in ordered:
        for adapter in served.adapters:
            index.setdefault(adapter, served)
    return index


def ready_address(pod: Mapping[str, Any]) -> str | None:
    """host:port of an engine Pod that is Ready and not being deleted, else None."""
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or pod["metadata"].get("deletionTimestamp"):
        return None
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []):
        return None
    ports = (p.get("containerPort") for c in (pod.get("spec") or {}).get("containers") or []
             for p in c.get("ports") or [] if p.get("name") == "http")
    return f"{ip}:{next(ports, ENGINE_PORT)}"


def epoch(timestamp: str) -> int:
    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()) if timestamp else 0


class WakeTimeout(Exception):
    """No replica became Ready in time."""


@dataclass
class Fleet:
    """The LLMDeployments and Ready engine addresses of the watched namespaces; ``None``: every namespace."""

    kube: Kube
    namespaces: tuple[str, ...] | None = None
    secret_keys: SecretKeys = field(init=False)
    deployments: dict[Key, Served] = field(default_factory=dict)
    endpoints: dict[Key, dict[str, str]] = field(default_factory=dict)  # -> pod name -> host:port
    by_model: dict[str, Served] = field(default_factory=dict)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    on_wake: Callable[[Served], None] = lambda served: None  # called once per scale-up from zero
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _wakes: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    _synced: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.secret_keys = SecretKeys(self.kube)

    # -- watching ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the watches until cancelled."""
        scopes: Iterable[str | None] = self.namespaces or (None,)
        await asyncio.gather(*(
            follow for scope in scopes for follow in (
                self._follow(self._path(f"/apis/{api.GROUP}/{api.VERSION}", api.PLURAL, scope), {},
                             scope, self._deployments_listed, self._deployment_event, "llmd"),
                self._follow(self._path("/api/v1", "pods", scope), {"labelSelector": ENGINE_PODS},
                             scope, self._pods_listed, self._pod_event, "pods"),
            )))

    @staticmethod
    def _path(prefix: str, plural: str, namespace: str | None) -> str:
        return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"

    async def _follow(self, path: str, params: dict[str, str], scope: str | None,
                      listed: Callable[[str | None, list[dict[str, Any]]], None],
                      event: Callable[[str, dict[str, Any]], None], what: str) -> None:
        while True:
            try:
                found = await self.kube.request("GET", path, params=params)
                listed(scope, found.get("items") or [])
                self._mark_synced(f"{what}/{scope}")
                version = found["metadata"]["resourceVersion"]
                while True:
                    watch = {**params, "resourceVersion": version, "allowWatchBookmarks": "true",
                             "timeoutSeconds": str(WATCH_SECONDS)}
                    async for change in self.kube.watch(path, watch):
                        obj = change["object"]
                        if change["type"] == "ERROR":  # 410 Gone, mostly: list again
                            raise KubeError(obj.get("code", 0), obj.get("message", "watch error"))
                        version = obj["metadata"]["resourceVersion"]
                        if change["type"] != "BOOKMARK":
                            event(change["type"], obj)
            except (KubeError, ValueError, KeyError) as exc:  # refused, dropped, or an answer cut short
                log.warning("watching %s: %s; listing again", path, exc)
                await asyncio.sleep(RELIST_DELAY)

    def _mark_synced(self, what: str) -> None:
        self._synced.add(what)
        if len(self._synced) == 2 * len(self.namespaces or (None,)):
            self.synced.set()

    def _deployments_listed(self, scope: str | None, items: list[dict[str, Any]]) -> None:
        current = {(o["metadata"]["namespace"], o["metadata"]["name"]): served_from(o) for o in items}
        for key in [k for k in self.deployments if scope in (None, k[0]) and k not in current]:
            del self.deployments[key]
        self.deployments.update(current)
        self._reindex()

    def _deployment_event(self, kind: str, obj: dict[str, Any]) -> None:
        served = served_from(obj)
        if kind == "DELETED":
            self.deployments.pop(served.key, None)
        else:
            self.deployments[served.key] = served
        self._reindex()

    def _reindex(self) -> None:
        self.by_model = model_index(self.deployments.values())
        self._notify()

    def _pods_listed(self, scope: str | None, items: list[dict[str, Any]]) -> None:
        for key in [k for k in self.endpoints if scope in (None, k[0])]:
            del self.endpoints[key]
        for pod in items:
            self._pod_event("ADDED", pod)
        self._notify()

    def _pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        owner = (meta.get("labels") or {}).get(SELECTOR_LABEL)
        if not owner:
            return
        key = (meta["namespace"], owner)
        address = None if kind == "DELETED" else ready_address(pod)
        pods = self.endpoints.setdefault(key, {})
        if address is None:
            pods.pop(meta["name"], None)
        else:
            pods[meta["name"]] = address
        if not pods:
            del self.endpoints[key]
        self._notify()

    def _notify(self) -> None:
        # Wakes every waiter; each checks what it waits for and waits again if that has not happened.
        self._changed.set()
        self._changed = asyncio.Event()

    # -- serving ------------------------------------------------------------------------------------

    def addresses(self, key: Key) -> dict[str, str]:
        return self.endpoints.get(key) or {}

    def waking(self, key: Key) -> bool:
        return key in self._wakes

    async def ready_addresses(self, served: Served, timeout: float) -> dict[str, str]:
        """Ready addresses of ``served``, waking it from zero replicas first if need be; WakeTimeout when none
        is Ready within ``timeout``. Requests that wait together share one wake and one scale-up."""
        key = served.key
        if addresses := self.addresses(key):
            return addresses
        wake = self._wakes.get(key)
        if wake is None:
            if served.replicas > 0:
                raise WakeTimeout(f"{served.namespace}/{served.name} has no Ready replica")
            wake = self._wakes[key] = asyncio.create_task(self._wake(served))
            wake.add_done_callback(lambda _: self._wakes.pop(key, None))
        try:
            await asyncio.wait_for(asyncio.shield(wake), timeout)
        except asyncio.TimeoutError:
            raise WakeTimeout(f"{served.namespace}/{served.name} had no Ready replica within {timeout:g} s") from None
        if addresses := self.addresses(key):
            return addresses
        raise WakeTimeout(f"{served.namespace}/{served.name} has no Ready replica")

    async def _wake(self, served: Served) -> None:
        """Scale ``served`` to one replica and wait until one is Ready (the callers bound the wait)."""
        key = served.key
        try:
            scaled = await self.kube.scale(served.namespace, served.name, 1)
        except KubeError as exc:
            log.warning("waking %s/%s from zero: %s", served.namespace, served.name, exc)
            return
        log.info("woke %s/%s from zero replicas", served.namespace, served.name)
        self.on_wake(served)
        if key in self.deployments:  # the watch brings the new spec later; until then, it is at 1
            self.deployments[key] = replace(self.deployments[key],
                                            replicas=int((scaled.get("spec") or {}).get("replicas", 1)))
        while not self.addresses(key) and key in self.deployments:
            await self._changed.wait()

    async def api_key(self, served: Served) -> str | None:
        """The key in ``served``'s API key Secret (None when the Secret or its key is missing); KubeError when it
        cannot be read."""
        assert served.api_key_ref is not None
        return await self.secret_keys.get(served.namespace, *served.api_key_ref)
