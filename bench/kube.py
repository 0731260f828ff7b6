"""The benchmark's API client: the operator's own ``Kube`` plus watches, plain-text GETs and applies
under a field manager of its own, so the benchmark never writes as the operator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from vllm_operator import api
from vllm_operator.kube import Kube, KubeError, object_path

FIELD_MANAGER = "vllm-operator-bench"
# A watch is ended by the apiserver after this long and opened again from the last version seen.
WATCH_SECONDS = 600
# The apiserver's answer to a watch from a version it no longer holds (a busy apiserver's window is short).
GONE = 410

Obj = dict[str, Any]
OnEvent = Callable[[str, Obj], None]


def llmdeployment_path(namespace: str, name: str | None = None) -> str:
    return object_path(api.KIND, namespace, name)


class BenchKube(Kube):
    async def apply_at(self, path: str, manifest: Mapping[str, Any]) -> Obj:
        """Server-side apply of ``manifest`` at ``path`` (an object or its status)."""
        return await self.request("PATCH", path, body=manifest, params={"fieldManager": FIELD_MANAGER, "force": "true"},
                                  content_type="application/apply-patch+yaml")

    async def apply_llmdeployment(self, manifest: Mapping[str, Any]) -> Obj:
        meta = manifest["metadata"]
        return await self.apply_at(llmdeployment_path(meta["namespace"], meta["name"]), manifest)

    async def get_or_none(self, path: str) -> Obj | None:
        try:
            return await self.request("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def text(self, path: str) -> str:
        async with self._client().get(path, headers=self._credentials.headers()) as response:
            body = await response.text()
            if response.status != 200:
                raise KubeError(response.status, f"GET {path} answered {response.status}: {body[:200]}")
            return body

    async def watch(self, path: str, on_event: OnEvent, label_selector: str | None = None) -> asyncio.Task[None]:
        """List ``path``, then follow it in a task; returns once the watch stream is open, so no
        event after this call can be missed or seen late. ``on_event(type, object)`` runs for each."""
        params = {"labelSelector": label_selector} if label_selector else {}
        version = await self._list(path, params, on_event)
        opened = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._follow(path, params, version, on_event, opened))
        await asyncio.wait([opened, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # the stream failed before it opened: raise why
        return task

    async def _list(self, path: str, params: Mapping[str, str], on_event: OnEvent) -> str:
        """Every object at ``path`` as ADDED; the version to watch from."""
        listing = await self.request("GET", path, params=params)
        for item in listing["items"]:
            on_event("ADDED", item)
        return str(listing["metadata"]["resourceVersion"])

    async def _follow(self, path: str, params: Mapping[str, str], version: str, on_event: OnEvent,
                      opened: asyncio.Future[None]) -> None:
        while True:
            query = {**params, "watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
                     "timeoutSeconds": str(WATCH_SECONDS)}
            async with self._client().get(path, params=query, headers=self._credentials.headers(),
                                          timeout=aiohttp.ClientTimeout()) as response:
                if response.status not in (200, GONE):
                    raise KubeError(response.status, f"watch {path} answered {response.status}")
                if not opened.done():
                    opened.set_result(None)
                last = await self._deliver(path, response, version, on_event) if response.status == 200 else None
            # A version the apiserver no longer holds: list again, as informers do. What changed meanwhile
            # arrives with the list; a deletion meanwhile is not seen, and no measurement awaits one.
            version = last if last is not None else await self._list(path, params, on_event)

    @staticmethod
    async def _deliver(path: str, response: aiohttp.ClientResponse, version: str, on_event: OnEvent) -> str | None:
        """Hand a watch stream's events on; the last version seen, or None when the apiserver no longer has it."""
        async for line in response.content:
            event = json.loads(line)
            if event["type"] == "ERROR":
                status = event["object"]
                if status.get("code") == GONE:
                    return None
                raise KubeError(status.get("code", 0), f"watch {path}: {status.get('message')}")
            version = event["object"]["metadata"]["resourceVersion"]
            if event["type"] != "BOOKMARK":
                on_event(event["type"], event["object"])
        return version
