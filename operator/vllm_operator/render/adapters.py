"""Where spec.adapters meets the engine: the LoRA flags, the claims mounted for adapters, the folder each adapter
is loaded from, and the readiness gate that keeps a new engine out of traffic until it has them.

Pure functions; the loading itself is adapters/ (the operator asks each running engine at run time).
"""

from __future__ import annotations

import hashlib
from typing import Any

from collections.abc import Mapping

from vllm_operator.api import DEFAULT_MAX_LORAS, GROUP, AdapterSpec, LLMDeploymentSpec, adapter_source, lora_enabled
from vllm_operator.render.paths import HF_HOME

ADAPTERS_MOUNT = "/adapters"
# The Pod condition the operator sets once a started engine has every adapter of the spec (or its engine's refusal).
READINESS_GATE = f"{GROUP}/adapters-loaded"
# Without it vLLM has no /v1/load_lora_adapter and /v1/unload_lora_adapter.
RUNTIME_UPDATES_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def lora_args(spec: LLMDeploymentSpec) -> list[str]:
    """--enable-lora and its sizes; every listed adapter stays in the engine's memory (--max-cpu-loras)."""
    if not lora_enabled(spec):
        return []
    most = str(spec.engine.max_loras or DEFAULT_MAX_LORAS)
    args = ["--enable-lora", "--max-loras", most, "--max-cpu-loras", most]
    if spec.engine.max_lora_rank is not None:
        args += ["--max-lora-rank", str(spec.engine.max_lora_rank)]
    return args


def adapter_claims(spec: LLMDeploymentSpec) -> list[str]:
    return sorted({claim for kind, claim, _ in map(adapter_source, (a.source for a in spec.adapters)) if kind == "pvc"})


def claim_volume(claim: str) -> str:
    """A volume name within 63 characters for any claim name."""
    return "adapters-" + hashlib.sha256(claim.encode()).hexdigest()[:12]


def adapter_volumes(spec: LLMDeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each claim adapters come from, read-only at /adapters/<claim>."""
    claims = adapter_claims(spec)
    volumes = [{"name": claim_volume(c), "persistentVolumeClaim": {"claimName": c, "readOnly": True}} for c in claims]
    mounts = [{"name": claim_volume(c), "mountPath": f"{ADAPTERS_MOUNT}/{c}", "readOnly": True} for c in claims]
    return volumes, mounts


def hub_snapshot(repo: str, commit: str) -> str:
    """The folder of a repo's commit in the engines' Hugging Face cache, where the download Job put it."""
    return f"{HF_HOME}/hub/models--{repo.replace('/', '--')}/snapshots/{commit}"


def adapter_path(adapter: AdapterSpec, commit: str | None = None) -> str:
    """What the engine loads the adapter from: its folder; for one from the hub, the downloaded commit's
    snapshot, or the repo id when the commit is unknown (the engine then finds it in its cache itself)."""
    kind, claim, path = adapter_source(adapter.source)
    if kind == "hf":
        return hub_snapshot(path, commit) if commit else path
    return f"{ADAPTERS_MOUNT}/{claim}/{path}".rstrip("/") if kind == "pvc" else path


def wanted_adapters(spec: LLMDeploymentSpec, downloaded: Mapping[str, str | None]) -> dict[str, str]:
    """Adapter name -> what each engine loads it from. Adapters from the hub are wanted once ``downloaded`` has
    them (name -> the commit the download resolved, if it said)."""
    return {adapter.name: adapter_path(adapter, downloaded.get(adapter.name)) for adapter in spec.adapters
            if adapter_source(adapter.source)[0] != "hf" or adapter.name in downloaded}
