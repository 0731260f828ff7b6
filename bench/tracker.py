"""What watches on one namespace saw, timed on arrival: when every child of each LLMDeployment
existed, and when its status first reported the generation that was applied; and, for whoever
listens, every LLMDeployment as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

from bench.kube import BenchKube, Obj, llmdeployment_path
from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.kube import object_path
from vllm_operator.render.manifests import SELECTOR_LABEL, Owner, children


def expected_children(manifest: Mapping[str, Any]) -> frozenset[str]:
    """The child kinds the operator creates for this LLMDeployment (a PDB only with several replicas)."""
    meta = manifest["metadata"]
    built = children(LLMDeploymentSpec.model_validate(manifest["spec"]), Owner(meta["name"], meta["namespace"], ""))
    return frozenset(kind for (kind, _name), child in built.items() if child is not None)


class Tracker:
    def __init__(self, kinds: Collection[str]) -> None:
        self.kinds = frozenset(kinds)
        self.objects: dict[str, Obj] = {}  # the latest LLMDeployments by name
        self._seen: dict[str, set[str]] = {}
        self.children_at: dict[str, float] = {}
        self.current_at: dict[str, float] = {}
        self.done_at: dict[str, float] = {}  # both of the above
        # Called with (name, LLMDeployment, arrival time) for each one that arrives, deletions aside.
        self.listeners: list[Callable[[str, Obj, float], None]] = []
        self._changed = asyncio.Event()
        self._watches: list[asyncio.Task[None]] = []

    async def follow(self, kube: BenchKube, namespace: str) -> None:
        self._watches.append(await kube.watch(llmdeployment_path(namespace), self._resource))
        for kind in self.kinds:
            self._watches.append(await kube.watch(object_path(kind, namespace), self._child(kind),
                                                  label_selector=SELECTOR_LABEL))
        for task in self._watches:
            # A watch that fails must end a wait at once, not at its timeout.
            task.add_done_callback(lambda _: self._changed.set())

    async def close(self) -> None:
        for task in self._watches:
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)

    def _child(self, kind: str) -> Callable[[str, Obj], None]:
        def handle(event_type: str, obj: Obj) -> None:
            owner = obj["metadata"]["labels"][SELECTOR_LABEL]
            seen = self._seen.setdefault(owner, set())
            seen.add(kind)
            if owner not in self.children_at and self.kinds <= seen:
                self.children_at[owner] = time.monotonic()
                self._check_done(owner)

        return handle

    def _resource(self, event_type: str, obj: Obj) -> None:
        name, arrived = obj["metadata"]["name"], time.monotonic()
        if event_type == "DELETED":
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj
            observed = (obj.get("status") or {}).get("observedGeneration")
            if name not in self.current_at and observed == obj["metadata"].get("generation"):
                self.current_at[name] = arrived
                self._check_done(name)
            for listener in self.listeners:
                listener(name, obj, arrived)
        self._changed.set()

    def _check_done(self, name: str) -> None:
        if name in self.children_at and name in self.current_at:
            self.done_at[name] = max(self.children_at[name], self.current_at[name])
        self._changed.set()

    async def wait(self, what: str, reached: Callable[[], bool], timeout: float) -> None:
        """Return once ``reached()`` holds, checked after each event; TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout
        while not reached():
            for task in self._watches:
                if task.done() and not task.cancelled():
                    task.result()  # raises what ended the watch
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what}: not reached within {timeout:.0f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


@contextlib.asynccontextmanager
async def tracking(kube: BenchKube, namespace: str, kinds: Collection[str]) -> AsyncIterator[Tracker]:
    """A Tracker fed by watches of the namespace's LLMDeployments and of ``kinds`` of their children."""
    tracker = Tracker(kinds)
    try:
        await tracker.follow(kube, namespace)
        yield tracker
    finally:
        await tracker.close()
