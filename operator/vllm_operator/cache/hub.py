"""What the Hugging Face hub says of a model before anything downloads: its config.json and safetensors sizes,
for the fit check. The operator's only call to the hub.

Through ``huggingface_hub`` (synchronous, so in a thread), at the endpoint the operator's ``HF_ENDPOINT`` names.
Without a token: the operator has no access to Secrets, so a gated repo stays unjudged (the check says so)
rather than the operator reading the LLMDeployment's token. One LLMDeployment or a thousand of the same model
ask the hub once: answers are kept per repo and revision, failures for a shorter while, and concurrent asks share
one call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from huggingface_hub import constants

from vllm_operator.cache.fit import Checkpoint

TIMEOUT_SECONDS = 5.0
# A model's files do not change under a commit; a branch such as main may, so answers are not kept forever.
KEEP_SECONDS = 3600.0
# An unreachable hub is asked again after this long, not on every reconcile.
KEEP_FAILURE_SECONDS = 60.0


@dataclass(frozen=True)
class Unjudged:
    """Why the hub gave nothing to judge: the fit check then says Unknown, never DoesNotFit."""

    message: str


Answer = Checkpoint | Unjudged
Fetch = Callable[[str, str, str | None], Answer]


def fetch(endpoint: str, repo: str, revision: str | None) -> Answer:
    """config.json and file sizes of ``repo`` at ``revision`` (blocking)."""
    # Imported on the first check: its client is 8 MiB of the operator's memory (measured), and an operator
    # whose models come from claims, files or filled caches (HF_HUB_OFFLINE) never asks the hub.
    from huggingface_hub import HfApi, get_session, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        return Unjudged("the operator runs with HF_HUB_OFFLINE, so the hub is not asked")
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True,
                                                   timeout=TIMEOUT_SECONDS, token=False)
        url = hf_hub_url(repo, "config.json", revision=info.sha or revision, endpoint=endpoint)
        response = get_session().get(url, timeout=TIMEOUT_SECONDS, follow_redirects=True)
        response.raise_for_status()
        config = json.loads(response.text)
    except GatedRepoError:
        return Unjudged(f"{repo} is gated and the operator reads no tokens; annotate the LLMDeployment to skip the "
                        "check or rely on the engine's own memory check")
    except RepositoryNotFoundError:
        return Unjudged(f"the hub at {endpoint} has no repo {repo} (or it is private)")
    except RevisionNotFoundError:
        return Unjudged(f"{repo} has no revision {revision}")
    except Exception as exc:  # noqa: BLE001 - also the HTTP client's own transport errors: no answer is no answer
        return Unjudged(f"the hub at {endpoint} did not answer for {repo}: {type(exc).__name__}")
    if not isinstance(config, dict):
        return Unjudged(f"config.json of {repo} is not a JSON object")
    sizes = {s.rfilename: s.size for s in info.siblings or [] if s.size is not None}
    parameters = dict(info.safetensors.parameters) if info.safetensors is not None else None
    return Checkpoint.from_hub(repo, config, sizes, parameters)


class HubMetadata:
    """Answers kept per (repo, revision); one call in flight per pair."""

    def __init__(self, endpoint: str | None = None, fetcher: Fetch = fetch,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = endpoint or constants.ENDPOINT  # HF_ENDPOINT, else huggingface.co
        self._fetch = fetcher
        self._clock = clock
        self._kept: dict[tuple[str, str | None], tuple[float, Answer]] = {}
        self._pending: dict[tuple[str, str | None], Awaitable[Answer]] = {}

    async def checkpoint(self, repo: str, revision: str | None) -> Answer:
        key = (repo, revision)
        kept = self._kept.get(key)
        if kept is not None and kept[0] > self._clock():
            return kept[1]
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(asyncio.to_thread(self._fetch, self.endpoint, repo, revision))
        try:
            answer = await asyncio.shield(pending)
        finally:
            self._pending.pop(key, None)
        keep = KEEP_FAILURE_SECONDS if isinstance(answer, Unjudged) else KEEP_SECONDS
        self._kept[key] = (self._clock() + keep, answer)
        return answer
