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
        listing = await self.request("GET", path, params=params)
        for item in listing["items"]:
            on_event("ADDED", item)
        opened = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._follow(path, params, listing["metadata"]["resourceVersion"], on_event, opened))
        await asyncio.wait([opened, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # the stream failed before it opened: raise why
        return task

    async def _follow(self, path: str, params: Mapping[str, str], version: str, on_event: OnEvent,
                      opened: asyncio.Future[None]) -> None:
        while True:
            query = {**params, "watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
                     "timeoutSeconds": str(WATCH_SECONDS)}
            async with self._client().get(path, params=query, headers=self._credentials.headers(),
                                          timeout=aiohttp.ClientTimeout()) as response:
                if response.status != 200:
                    raise KubeError(response.status, f"watch {path} answered {response.status}")
                if not opened.done():
                    opened.set_result(None)
                async for line in response.content:
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        status = event["object"]
                        raise KubeError(status.get("code", 0), f"watch {path}: {status.get('message')}")
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        on_event(event["type"], event["object"])
