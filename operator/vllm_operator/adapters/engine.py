"""vLLM's runtime LoRA API, as the operator calls it: list with /v1/models, load and unload with
/v1/load_lora_adapter and /v1/unload_lora_adapter (the engine runs with VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

# Listing is quick; a load reads the adapter's weights from disk, which on a cold network volume takes a while.
LIST_TIMEOUT_SECONDS = 5.0
LOAD_TIMEOUT_SECONDS = 120.0
MESSAGE_LIMIT = 500


class EngineError(Exception):
    """The engine refused (its own message) or could not be reached."""


def error_message(status: int, body: str) -> str:
    """The message of an OpenAI-shaped error body ({"error": {"message"}}), else the body itself."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        message = error.get("message") if isinstance(error, dict) else parsed.get("message")
        if isinstance(message, str):
            return message[:MESSAGE_LIMIT]
    return f"HTTP {status}: {body.strip()[:MESSAGE_LIMIT]}"


class AdapterClient:
    """One pooled session for every engine."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        return self._session

    async def _call(self, method: str, url: str, api_key: str | None, timeout: float,
                    body: dict[str, Any] | None = None) -> str:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            async with self._client().request(method, url, json=body, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise EngineError(f"{method} {url}: {str(exc) or type(exc).__name__}") from exc
        if response.status >= 400:
            raise EngineError(error_message(response.status, text))
        return text

    async def models(self, base_url: str, api_key: str | None) -> dict[str, Any]:
        text = await self._call("GET", f"{base_url}/v1/models", api_key, LIST_TIMEOUT_SECONDS)
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise EngineError(f"/v1/models answered no JSON: {text[:MESSAGE_LIMIT]}") from exc
        if not isinstance(body, dict):
            raise EngineError("/v1/models answered no object")
        return body

    async def load(self, base_url: str, api_key: str | None, name: str, path: str) -> None:
        await self._call("POST", f"{base_url}/v1/load_lora_adapter", api_key, LOAD_TIMEOUT_SECONDS,
                         {"lora_name": name, "lora_path": path})

    async def unload(self, base_url: str, api_key: str | None, name: str) -> None:
        await self._call("POST", f"{base_url}/v1/unload_lora_adapter", api_key, LIST_TIMEOUT_SECONDS,
                         {"lora_name": name})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
