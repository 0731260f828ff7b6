"""Pre-fill an LLMDeployment's model cache claim with the tiny model, as a pre-download job
would in a real cluster: once the claim is bound, its local folder gets the Hugging Face cache
layout under the path the engine reads as ``HF_HOME``."""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devcluster import engine
from vllm_operator.render.engine_args import CACHE_MOUNT, HF_HOME
from vllm_operator.render.manifests import cache_claim_name

TIMEOUT = (5, 30)


def claim_folder(api: client.ApiClient, namespace: str, claim: str, timeout: float = 120) -> Path:
    """The local folder behind a bound claim of the local-path class."""
    core = client.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = core.read_namespaced_persistent_volume_claim(claim, namespace, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise
            found = None
        if found is not None and found.status.phase == "Bound":
            volume = core.read_persistent_volume(found.spec.volume_name, _request_timeout=TIMEOUT)
            if volume.spec.host_path is None:
                raise engine.EngineError(f"claim {namespace}/{claim} is not backed by a local folder")
            return Path(volume.spec.host_path.path)
        time.sleep(0.3)
    raise engine.EngineError(f"claim {namespace}/{claim} was not bound within {timeout:.0f}s; "
                             "is the local-runtime agent running (`python -m devcluster status`)?")


def prefill_model_cache(api: client.ApiClient, namespace: str, llmdeployment: str, timeout: float = 120) -> Path:
    """Seed the claim the operator creates for ``llmdeployment``; returns the model snapshot folder."""
    folder = claim_folder(api, namespace, cache_claim_name(llmdeployment), timeout)
    hf_home = folder / PurePosixPath(HF_HOME).relative_to(CACHE_MOUNT)
    # A running engine may be reading the copy that is there already.
    return engine.model_snapshot(hf_home) or engine.seed_hf_cache(hf_home)
