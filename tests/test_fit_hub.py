"""The fit check's view of a model from the hub (cache/hub.py), against the local hub and the real
huggingface_hub client: what it reads, what it cannot judge, and that a fleet of one model asks once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import pytest

from devcluster.hub import GATED_REPO, LocalHub, default_repos
from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.cache.fit import Checkpoint, Deployment, DoesNotFit, Fits, check_fit
from vllm_operator.cache.hub import HubMetadata, Unjudged

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_70B = "meta-llama/Llama-3.1-70B-Instruct"
H100 = "NVIDIA-H100-80GB-HBM3"


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with LocalHub(default_repos(None)).serve() as running:
        yield running


def on_one_h100(model: str) -> Deployment:
    return Deployment.from_spec(LLMDeploymentSpec.model_validate({
        "model": {"name": model}, "accelerator": {"type": "nvidia", "product": H100}}))


def test_the_hub_answer_judges_70b_too_big_and_8b_fitting_one_h100(hub: LocalHub) -> None:
    metadata = HubMetadata(hub.url)
    big, small = asyncio.run(metadata.checkpoint(LLAMA_70B, None)), asyncio.run(metadata.checkpoint(LLAMA_8B, None))
    assert isinstance(big, Checkpoint) and isinstance(small, Checkpoint)
    verdict = check_fit(big, on_one_h100(LLAMA_70B))
    assert isinstance(verdict, DoesNotFit) and "accelerator.count: 4" in verdict.message
    assert isinstance(check_fit(small, on_one_h100(LLAMA_8B)), Fits)


def test_what_the_hub_cannot_tell_is_unjudged_never_too_big(hub: LocalHub) -> None:
    metadata = HubMetadata(hub.url)
    gated = asyncio.run(metadata.checkpoint(GATED_REPO, None))
    assert isinstance(gated, Unjudged) and "gated" in gated.message
    missing = asyncio.run(metadata.checkpoint("nobody/nothing", None))
    assert isinstance(missing, Unjudged) and "nobody/nothing" in missing.message
    revision = asyncio.run(metadata.checkpoint(LLAMA_8B, "no-such-branch"))
    assert isinstance(revision, Unjudged) and "no-such-branch" in revision.message
    unreachable = asyncio.run(HubMetadata("http://127.0.0.1:9").checkpoint(LLAMA_8B, None))
    assert isinstance(unreachable, Unjudged) and "did not answer" in unreachable.message


def test_a_thousand_asks_for_one_model_reach_the_hub_once(hub: LocalHub) -> None:
    metadata = HubMetadata(hub.url)
    hub.reset_counts()

    async def fleet() -> list[object]:
        return await asyncio.gather(*(metadata.checkpoint(LLAMA_8B, None) for _ in range(1000)))

    answers = asyncio.run(fleet())
    assert all(answer is answers[0] for answer in answers)
    asked = hub.count()
    assert asked == 2, hub.requests  # the file list, then config.json
    asyncio.run(metadata.checkpoint(LLAMA_8B, None))
    assert hub.count() == asked, "kept, not asked again"


def test_the_operator_loads_the_hub_client_only_for_a_check() -> None:
    # An operator whose models need no check (claims, files, HF_HUB_OFFLINE) never pays its memory.
    code = ("import sys; import vllm_operator.handlers, vllm_operator.cli; "
            "sys.exit(1 if 'huggingface_hub.hf_api' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
