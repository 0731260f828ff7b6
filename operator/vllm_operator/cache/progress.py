"""Read the model puller's /progress while it downloads, over one pooled HTTP session (as the engine scraper does)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

# Short: a puller that does not answer at once is asked again at the next interval.
TIMEOUT_SECONDS = 2.0


class ProgressReader:
    def __init__(self, timeout: float = TIMEOUT_SECONDS) -> None:
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def read(self, url: str) -> dict[str, Any] | None:
        """The puller's progress JSON; None when it does not answer with one (not listening yet, gone, slow)."""
        if self._session is None or self._session.closed:
            # Created on first use, inside the running event loop that will own it.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    return None
                body = json.loads(await response.text())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
