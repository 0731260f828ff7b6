"""PrefixHash against LeastLoad on real engines: two vLLM CPU replicas of the tiny model behind the gateway, the
same shared-prefix workload sent under each strategy, judged by the engines' own prefix cache counters."""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp

from bench.engine_start import START_TIMEOUT, engine_pods, phase_ready, prefilled_example
from bench.gateway import gateway_process
from bench.report import Row
from bench.rig import Rig
from bench.sizes import Size
from devcluster import prefixload
from vllm_operator.render.engine_args import ENGINE_PORT

NAMESPACE = "bench-prefix"
REPLICAS = 2
STRATEGIES = ("LeastLoad", "PrefixHash")


def method(size: Size) -> str:
    return (f"**prefix cache hits by routing strategy**: `examples/cpu-tiny.yaml` on {REPLICAS} replicas (real vLLM "
            "CPU, one `ReadWriteMany` cache claim filled first) behind `vllm-operator gateway`. Under each strategy "
            f"in turn, {prefixload.TEAMS} teams, each with its own system prompt of about 100 tokens, ask "
            f"{prefixload.QUESTIONS} questions each, the teams taking turns ({prefixload.REQUESTS} requests, one at a "
            "time, one token answered); the figure is the share of prompt tokens the engines found in their prefix "
            "cache (`vllm:prefix_cache_hits_total` over `vllm:prefix_cache_queries_total`, summed over both "
            "replicas, read before and after). The prompts of each strategy are new to the engines.")


async def _counters(rig: Rig, namespace: str, name: str) -> tuple[float, float]:
    bodies = []
    for pod in await engine_pods(rig, namespace, name):
        async with rig.http.get(f"http://{pod['status']['podIP']}:{ENGINE_PORT}/metrics") as response:
            bodies.append(await response.text())
    return prefixload.prefix_counters(bodies)


async def _routing(rig: Rig, gateway: str, name: str, strategy: str) -> bool:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with rig.http.get(f"{gateway}/v1/models") as response:
            models: list[dict[str, Any]] = (await response.json())["data"]
            return any(m["id"] == name and m["routing"] == strategy for m in models)
    return False


async def _hit_percent(rig: Rig, manifest: dict, gateway: str, strategy: str) -> float:
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    manifest["spec"]["routing"] = {"strategy": strategy}
    await rig.kube.apply_llmdeployment(manifest)
    await rig.poll(f"the gateway routing {name} by {strategy}", lambda: _routing(rig, gateway, name, strategy), 30)
    before = await _counters(rig, namespace, name)
    for messages in prefixload.chats(strategy):
        async with rig.http.post(f"{gateway}/v1/chat/completions",
                                 json=prefixload.request_body(name, messages)) as response:
            if response.status != 200:
                raise RuntimeError(f"the gateway answered {response.status}: {await response.text()}")
    percent = prefixload.hit_percent(before, await _counters(rig, namespace, name))
    rig.out(f"  prefix cache hits with {strategy}: {percent:.1f}%")
    return percent


async def measure(rig: Rig, size: Size) -> list[Row]:
    async with rig.namespace(NAMESPACE) as namespace:
        manifest = await prefilled_example(rig, namespace, "ReadWriteMany")
        name = manifest["metadata"]["name"]
        manifest["spec"]["replicas"] = REPLICAS
        await rig.kube.apply_llmdeployment(manifest)
        await rig.poll(f"{name} Ready on {REPLICAS} replicas", lambda: phase_ready(rig, namespace, name),
                       REPLICAS * START_TIMEOUT)
        async with gateway_process(rig, namespace, name, START_TIMEOUT) as (gateway, _):
            percent = {strategy: await _hit_percent(rig, manifest, gateway, strategy) for strategy in STRATEGIES}
    return [Row(f"prefix cache hits, {prefixload.REQUESTS} requests of {prefixload.TEAMS} shared system prompts over "
                f"{REPLICAS} real replicas: LeastLoad / PrefixHash",
                f"{percent['LeastLoad']:.1f}% / {percent['PrefixHash']:.1f}%", "PrefixHash higher",
                percent["PrefixHash"] > percent["LeastLoad"])]
