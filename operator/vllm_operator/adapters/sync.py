"""The adapter loop: every interval, ask each started engine of an LLMDeployment with LoRA on which adapters it
has, load and unload the difference, open the engine Pod's readiness gate once it has them all, and tell the
controller what each engine has (status.adapters).

A load the engine refuses (a rank above --max-lora-rank, a folder that is not an adapter) is remembered with
the engine's message and tried again after plan.RETRY_SECONDS; the other adapters load regardless, and the
refusal still opens the gate: the base model and the other adapters serve meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from vllm_operator import observability
from vllm_operator.adapters.engine import AdapterClient, EngineError
from vllm_operator.adapters.plan import Refusal, loaded_adapters, plan, settled
from vllm_operator.api import KeyRef
from vllm_operator.kube import Kube, KubeError, SecretKeys, now_rfc3339
from vllm_operator.reconcile.queue import Key
from vllm_operator.render.adapters import READINESS_GATE

log = logging.getLogger("vllm_operator.adapters")

# Engines talked to at once; each talk is a listing and, now and then, a load.
CONCURRENCY = 32


@dataclass(frozen=True)
class AdapterTarget:
    """One LLMDeployment with LoRA on: the adapters it wants, and its started engines."""

    wanted: Mapping[str, str]  # name -> folder
    served_name: str
    api_key: KeyRef | None
    pods: Mapping[str, str]  # pod name -> base URL of its started engine
    gated: frozenset[str] = frozenset()  # started engines whose readiness gate is not open for them yet
    stale: frozenset[str] = frozenset()  # Pods whose gate was opened for an engine that has restarted since


@dataclass(frozen=True)
class ReplicaAdapters:
    """What one engine has of the wanted adapters, what it refused (with its words), or why it could not be asked."""

    loaded: frozenset[str] = frozenset()
    refused: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None


class Targets(Protocol):
    """What the loop needs of the controller."""

    def adapter_targets(self) -> dict[Key, AdapterTarget]: ...

    def update_adapters(self, key: Key, replicas: dict[str, ReplicaAdapters]) -> None: ...


class AdapterSync:
    def __init__(self, controller: Targets, kube: Kube, interval: float, client: AdapterClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.controller = controller
        self.kube = kube
        self.interval = interval
        self.client = client if client is not None else AdapterClient()
        self.clock = clock
        self._refused: dict[tuple[Key, str], dict[str, Refusal]] = {}
        self.keys = SecretKeys(kube, clock=clock)
        self._limit = asyncio.Semaphore(CONCURRENCY)
        self._reported: set[Key] = set()

    async def run(self) -> None:
        while True:
            started = self.clock()
            try:
                await self.sweep()
            except Exception:  # one bad sweep must not end the loop
                log.exception("adapter sweep failed")
            await asyncio.sleep(max(0.0, self.interval - (self.clock() - started)))

    async def sweep(self) -> None:
        targets = self.controller.adapter_targets()
        # A restarted engine has lost its adapters: out of traffic until it has them again.
        await asyncio.gather(*(self._gate(key[0], pod, opened=False) for key, target in targets.items()
                               for pod in target.stale), return_exceptions=True)
        replicas = [(key, pod) for key, target in targets.items() for pod in target.pods]
        results = await asyncio.gather(*(self._replica(key, targets[key], pod) for key, pod in replicas))
        by_key: dict[Key, dict[str, ReplicaAdapters]] = {key: {} for key in targets}
        for (key, pod), result in zip(replicas, results):
            by_key[key][pod] = result
        for key, found in by_key.items():
            self.controller.update_adapters(key, found)
        for key in self._reported - set(targets):
            self.controller.update_adapters(key, {})
        self._reported = set(targets)
        current = set(replicas)
        self._refused = {replica: refused for replica, refused in self._refused.items() if replica in current}

    async def _replica(self, key: Key, target: AdapterTarget, pod: str) -> ReplicaAdapters:
        async with self._limit:
            try:
                return await self._reconcile(key, target, pod)
            except EngineError as exc:
                return ReplicaAdapters(error=str(exc))
            except KubeError as exc:  # reading the API key's Secret, or opening the readiness gate
                return ReplicaAdapters(error=f"the apiserver: {exc}")

    async def _reconcile(self, key: Key, target: AdapterTarget, pod: str) -> ReplicaAdapters:
        url, wanted = target.pods[pod], target.wanted
        api_key = await self._api_key(key[0], target.api_key)
        loaded = loaded_adapters(await self.client.models(url, api_key), target.served_name)
        refused = self._refused.setdefault((key, pod), {})
        for name in [name for name, refusal in refused.items() if wanted.get(name) != refusal.path]:
            del refused[name]  # no longer wanted, or from another folder now
        steps = plan(wanted, loaded, refused, self.clock())
        for name in steps.unload:
            await self.client.unload(url, api_key, name)
            del loaded[name]
            observability.ADAPTER_CHANGES.labels(action="unload").inc()
        for name, path in steps.load.items():
            try:
                await self.client.load(url, api_key, name, path)
            except EngineError as exc:
                refused[name] = Refusal(path, self.clock(), str(exc))
                observability.ADAPTER_CHANGES.labels(action="refused").inc()
                continue
            loaded[name] = path
            refused.pop(name, None)
            observability.ADAPTER_CHANGES.labels(action="load").inc()
        if pod in target.gated and settled(wanted, loaded, refused):
            await self._gate(key[0], pod, opened=True)
        return ReplicaAdapters(frozenset(name for name, path in loaded.items() if wanted.get(name) == path),
                               {name: refusal.message for name, refusal in refused.items()})

    async def _api_key(self, namespace: str, ref: KeyRef | None) -> str | None:
        """The engines' API key, from the Secret spec.apiKeySecretRef names."""
        return None if ref is None else await self.keys.get(namespace, ref.name, ref.key)

    async def _gate(self, namespace: str, pod: str, opened: bool) -> None:
        """Open the readiness gate of an engine that has what the spec lists (the kubelet may then call it Ready),
        or close it. The time it opened tells a later restart of the engine (controller._gate_current)."""
        reason, message = ("AdaptersLoaded", "the engine has every adapter of spec.adapters, or its refusal") \
            if opened else ("EngineRestarted", "the engine restarted and is loading its adapters again")
        await self.kube.apply({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": namespace},
            "status": {"conditions": [{"type": READINESS_GATE, "status": "True" if opened else "False",
                                       "reason": reason, "message": message,
                                       "lastTransitionTime": now_rfc3339()}]},
        }, subresource="status")

    async def close(self) -> None:
        await self.client.close()
