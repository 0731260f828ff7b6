"""Start-up of a real vLLM CPU replica with an empty compile cache and with the one the cache PVC kept."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from pathlib import Path, PurePosixPath

import aiohttp
import yaml

from bench.report import Row, times
from bench.kube import llmdeployment_path
from bench.rig import Rig
from bench.sizes import Size
from devcluster import engine
from devcluster.cluster import REPO_ROOT
from devcluster.hub import TINY_REPO
from devcluster.prefill import claim_folder, prefill_model_cache
from vllm_operator.gateway.watch import ENGINE_PODS
from vllm_operator.render.engine_args import CACHE_MOUNT, ENGINE_PORT, VLLM_CACHE_ROOT
from vllm_operator.render.manifests import SELECTOR_LABEL, cache_claim_name

NAMESPACE = "bench-engine"
HUB_NAMESPACE = "bench-engine-hub"
EXAMPLE = REPO_ROOT / "examples" / "cpu-tiny.yaml"
TARGET_SAVING = 0.35
START_TIMEOUT = 420.0
POLL_SECONDS = 0.25


def method(size: Size) -> str:
    return (f"**engine start**: `examples/cpu-tiny.yaml` (real vLLM CPU on node `local-0`, the tiny model "
            f"copied into its cache PVC first), started {times(size.engine_starts)} with an empty compile cache "
            "(`VLLM_CACHE_ROOT` on the PVC removed while scaled to 0) and as often right after, with the cache "
            "the previous start left there. Timed from the Pod reported `Running` (the process started) to the "
            f"first 200 from the engine's `/health`, both polled every {POLL_SECONDS:g} s; medians compared. "
            "The Pod's Ready condition follows at the next probe (startup probe every 10 s).\n\n"
            "**wake-up from 0 replicas**: the warm starts again, timed from the apply that sets `spec.replicas` from 0 "
            "to 1 (what `kubectl scale` or a gateway does to an `Idle` LLMDeployment) to its `status.phase` `Ready`: "
            "scheduling, the engine's start with the model and compile cache the claim kept, the startup probe, "
            "and the status write.\n\n"
            "**cold start from the hub**: `examples/cpu-tiny.yaml` with the model `local/tiny` from the project's "
            "local hub (the operator's `HF_ENDPOINT`) on a new `ReadWriteMany` claim, timed from the apply to "
            "`status.phase` `Ready`: the fit check, the download Job, then the engine with an empty compile cache. "
            "Then a second LLMDeployment of the same model on the same claim: no Job (the download is shared) and "
            "the compile cache the first one left.")


async def engine_pods(rig: Rig, namespace: str, name: str) -> list[dict]:
    # Download and benchmark Pods carry the LLMDeployment's label too.
    found = await rig.kube.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                                   params={"labelSelector": f"{ENGINE_PODS},{SELECTOR_LABEL}={name}"})
    return list(found["items"])


async def _running_pod_ip(rig: Rig, namespace: str, name: str) -> str | None:
    for pod in await engine_pods(rig, namespace, name):
        status = pod.get("status") or {}
        if not pod["metadata"].get("deletionTimestamp") and status.get("phase") == "Running" and status.get("podIP"):
            return str(status["podIP"])
    return None


async def _no_pods(rig: Rig, namespace: str, name: str) -> bool:
    return not await engine_pods(rig, namespace, name)


async def _healthy(rig: Rig, ip: str) -> bool:
    try:
        url = f"http://{ip}:{ENGINE_PORT}/health"
        async with rig.http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def phase_ready(rig: Rig, namespace: str, name: str) -> bool:
    found = await rig.kube.get_or_none(llmdeployment_path(namespace, name))
    return bool(found and (found.get("status") or {}).get("phase") == "Ready")


async def _start_once(rig: Rig, manifest: dict, compile_cache: Path, warm: bool) -> tuple[float, float]:
    """Seconds from the Pod's start to /health, and from the scale to 1 to the LLMDeployment's Ready."""
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    if not warm:
        shutil.rmtree(compile_cache, ignore_errors=True)
    manifest["spec"]["replicas"] = 1
    woken = time.monotonic()
    await rig.kube.apply_llmdeployment(manifest)
    ip = await rig.poll(f"a Running engine Pod of {name}", lambda: _running_pod_ip(rig, namespace, name),
                        START_TIMEOUT, POLL_SECONDS)
    started = time.monotonic()
    await rig.poll(f"/health of the engine at {ip}", lambda: _healthy(rig, ip), START_TIMEOUT, POLL_SECONDS)
    took = time.monotonic() - started
    await rig.poll(f"{name} Ready", lambda: phase_ready(rig, namespace, name), START_TIMEOUT, POLL_SECONDS)
    wake = time.monotonic() - woken
    manifest["spec"]["replicas"] = 0
    await rig.kube.apply_llmdeployment(manifest)
    await rig.poll(f"the engine Pod of {name} gone", lambda: _no_pods(rig, namespace, name), 120)
    rig.out(f"  engine start ({'warm' if warm else 'cold'} compile cache): {took:.1f}s, {wake:.1f}s to Ready")
    return took, wake


SHARED_CLAIM = "models"


async def _apply_to_ready(rig: Rig, manifest: dict) -> float:
    """Seconds from the apply of a new LLMDeployment to its Ready; it is deleted afterwards."""
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    applied = time.monotonic()
    await rig.kube.apply_llmdeployment(manifest)
    await rig.poll(f"{name} Ready", lambda: phase_ready(rig, namespace, name), START_TIMEOUT, POLL_SECONDS)
    took = time.monotonic() - applied
    await rig.kube.request("DELETE", llmdeployment_path(namespace, name))
    await rig.poll(f"the engine Pod of {name} gone", lambda: _no_pods(rig, namespace, name), 120)
    return took


async def _cold_and_shared(rig: Rig) -> tuple[float, float]:
    """Apply to Ready of the tiny model from the local hub on a new claim (the download Job, then the engine with
    an empty compile cache), then of a second LLMDeployment of it on that claim (no Job, the compile cache kept)."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["model"]["name"] = TINY_REPO
    manifest["spec"]["engine"].pop("env")  # not offline: the operator downloads it first
    manifest["spec"]["cache"] = {"existingClaim": SHARED_CLAIM}
    async with rig.namespace(HUB_NAMESPACE) as namespace:
        await rig.kube.request("POST", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", body={
            "metadata": {"name": SHARED_CLAIM},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
        times_ = []
        for name in ("cold", "shared"):
            manifest["metadata"] = {"name": name, "namespace": namespace}
            times_.append(await _apply_to_ready(rig, manifest))
            rig.out(f"  apply to Ready, {name} cache: {times_[-1]:.1f}s")
    return times_[0], times_[1]


async def prefilled_example(rig: Rig, namespace: str, access_mode: str | None = None) -> dict:
    """`examples/cpu-tiny.yaml` applied in ``namespace`` at 0 replicas, its cache claim filled with the tiny model."""
    await asyncio.to_thread(engine.ensure)
    await asyncio.to_thread(engine.model)
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["namespace"] = namespace
    if access_mode is not None:
        manifest["spec"]["cache"]["accessMode"] = access_mode
    manifest["spec"]["replicas"] = 0  # no engine until the model is in the claim
    await rig.kube.apply_llmdeployment(manifest)
    await asyncio.to_thread(prefill_model_cache, rig.api_client, namespace, manifest["metadata"]["name"])
    return manifest


async def measure(rig: Rig, size: Size) -> list[Row]:
    async with rig.namespace(NAMESPACE) as namespace:
        manifest = await prefilled_example(rig, namespace)
        name = manifest["metadata"]["name"]
        folder = await asyncio.to_thread(claim_folder, rig.api_client, namespace, cache_claim_name(name))
        compile_cache = folder / PurePosixPath(VLLM_CACHE_ROOT).relative_to(CACHE_MOUNT)
        cold, warm, wakes = [], [], []
        for _ in range(size.engine_starts):
            cold.append((await _start_once(rig, manifest, compile_cache, warm=False))[0])
            took, wake = await _start_once(rig, manifest, compile_cache, warm=True)
            warm.append(took)
            wakes.append(wake)
    first, shared = await _cold_and_shared(rig)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    saving = 1 - warm_s / cold_s
    return [Row(f"engine start to /health, median of {size.engine_starts}: cold / warm compile cache",
                f"{cold_s:.1f} / {warm_s:.1f} s ({100 * saving:.0f}% faster)",
                f">= {100 * TARGET_SAVING:.0f}% faster", saving >= TARGET_SAVING),
            Row(f"wake-up from 0 replicas to Ready, warm caches, median of {size.engine_starts}",
                f"{statistics.median(wakes):.1f} s (max {max(wakes):.1f} s)"),
            Row("apply to Ready from the hub: cold cache (download Job) / shared cache (a second LLMDeployment)",
                f"{first:.1f} / {shared:.1f} s", "shared faster", shared < first)]
