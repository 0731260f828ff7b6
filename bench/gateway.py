"""What the gateway costs: `vllm-operator gateway`, pinned to one core, in front of one simulated engine, against
requests sent straight to that engine's Pod IP by the same client, in the same run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.freshness import nearest_rank
from bench.kube import llmdeployment_path
from bench.report import Row
from bench.rig import Rig, cpu_seconds, llmdeployment
from bench.sizes import Size
from devcluster.operatorproc import as_in_image, free_port, operator_env
from vllm_operator.gateway.watch import ENGINE_PODS
from vllm_operator.render.engine_args import ENGINE_PORT

NAMESPACE = "bench-gateway"
NAME = "chat"
# One of the cluster's own kwok nodes: the rig's node is deleted when any run's rig ends, and runs of other
# measurements may share the cluster.
NODE = "cpu-0"
ADDED_P50_TARGET_MS = 1.0
RATE_TARGET = 2000
TTFB_TARGET_MS = 2.0
# Connections of the load client for the rate: enough that the gateway always has requests waiting.
CONCURRENCY = 64
# Windows per path for the rate, taking turns, so that what else the machine runs meanwhile falls on both alike.
ROUNDS = 3
# Requests per path before any is timed: connections opened, code paths warm.
WARMUP = 200
BODY = {"model": NAME, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}
ROUTE = "/v1/chat/completions"
START_TIMEOUT = 120.0


def method(size: Size) -> str:
    return f"""\
**gateway**: one LLMDeployment with one simulated engine on the kwok node `{NODE}`, and `vllm-operator gateway`
serving its namespace as a process of its own, pinned to one core (`sched_setaffinity`). One aiohttp client in the
benchmark's process sends the same chat completions (`max_tokens` {BODY['max_tokens']}) to the gateway and straight
to the engine's Pod IP, the two paths taking turns; {WARMUP} requests on each path go unmeasured first. **Added
latency**: the difference between the two paths' p50 and p99 over {size.gateway_requests:,} non-streamed requests
each, sent one at a time. **Rate**: {CONCURRENCY} connections, each sending again as soon as answered, {ROUNDS}
windows per path ({size.gateway_seconds:g} s per path in all). Judged are the requests the gateway serves per second
of its own CPU time (`/proc/<pid>/stat`, over its windows): what one busy core of it sustains. The rate measured
through it is shown with the share of its core it used, and beside the direct rate: the client, the engine and the
control plane share this machine's cores, and bound both. **Streamed time to first byte**: from sending a streamed
request to the first chunk of its body, p50 and p99 over {size.gateway_requests:,} requests per path, one at a
time."""


@dataclass(frozen=True)
class Paired:
    """Seconds the same requests took straight to the engine and through the gateway, measured taking turns."""

    direct: Sequence[float]
    gateway: Sequence[float]

    def added_ms(self, share: float) -> float:
        """What the gateway adds to the ``share`` percentile, in milliseconds."""
        return 1000 * (nearest_rank(self.gateway, share) - nearest_rank(self.direct, share))

    def result(self) -> str:
        return (f"+{self.added_ms(0.5):.2f} ms p50, +{self.added_ms(0.99):.2f} ms p99 "
                f"(gateway {1000 * nearest_rank(self.gateway, 0.5):.2f} / {1000 * nearest_rank(self.gateway, 0.99):.2f}"
                f" ms, direct {1000 * nearest_rank(self.direct, 0.5):.2f} / "
                f"{1000 * nearest_rank(self.direct, 0.99):.2f} ms)")


def latency_row(samples: Paired) -> Row:
    return Row(f"gateway: added latency, non-streamed chat completion, p50 / p99 ({len(samples.gateway):,} requests)",
               samples.result(), f"p50 <= +{ADDED_P50_TARGET_MS:g} ms", samples.added_ms(0.5) <= ADDED_P50_TARGET_MS)


def ttfb_row(samples: Paired) -> Row:
    return Row(f"gateway: added time to first byte, streamed chat completion, p50 / p99 "
               f"({len(samples.gateway):,} requests)",
               samples.result(), f"p50 <= +{TTFB_TARGET_MS:g} ms", samples.added_ms(0.5) <= TTFB_TARGET_MS)


@dataclass(frozen=True)
class Rate:
    """Requests answered by one path in its windows."""

    requests: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


def rate_row(direct: Rate, gateway: Rate, gateway_cpu: float) -> Row:
    """Judged on the requests the gateway serves per second of its own CPU: one busy core's rate."""
    per_core = gateway.requests / gateway_cpu if gateway_cpu > 0 else 0.0
    return Row(f"gateway: non-streamed chat completions per second on one core ({CONCURRENCY} connections)",
               f"{per_core:,.0f} per CPU-second ({1e6 / per_core if per_core else 0:.0f} µs each); "
               f"measured {gateway.per_second:,.0f}/s with the gateway at {100 * gateway_cpu / gateway.seconds:.0f}% "
               f"of its core, {direct.per_second:,.0f}/s straight to the engine",
               f">= {RATE_TARGET:,}/s", per_core >= RATE_TARGET)


# -- the measurement ------------------------------------------------------------------------------------------

Send = Callable[[aiohttp.ClientSession, str], Awaitable[float]]


async def _complete(http: aiohttp.ClientSession, base: str) -> float:
    """Seconds to one whole non-streamed answer."""
    started = time.perf_counter()
    async with http.post(base + ROUTE, json=BODY) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{base} answered {response.status}")
    return time.perf_counter() - started


async def _first_byte(http: aiohttp.ClientSession, base: str) -> float:
    """Seconds to the first chunk of a streamed answer's body (read to its end afterwards)."""
    started = time.perf_counter()
    async with http.post(base + ROUTE, json={**BODY, "stream": True}) as response:
        if response.status != 200 or not await response.content.readany():
            raise RuntimeError(f"{base} answered {response.status} to a stream")
        took = time.perf_counter() - started
        await response.read()
    return took


async def _taking_turns(http: aiohttp.ClientSession, direct: str, gateway: str, send: Send, count: int) -> Paired:
    for _ in range(WARMUP):
        await send(http, direct)
        await send(http, gateway)
    direct_s: list[float] = []
    gateway_s: list[float] = []
    for _ in range(count):
        direct_s.append(await send(http, direct))
        gateway_s.append(await send(http, gateway))
    return Paired(direct_s, gateway_s)


async def _window(http: aiohttp.ClientSession, base: str, seconds: float) -> Rate:
    """Requests answered in ``seconds`` by CONCURRENCY senders that each send again as soon as answered."""
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()

    async def sender() -> int:
        done = 0
        while time.perf_counter() < deadline:
            await _complete(http, base)
            done += 1
        return done

    counts = await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
    return Rate(sum(counts), time.perf_counter() - started)


async def _rates(http: aiohttp.ClientSession, direct: str, gateway: str, gateway_pid: int,
                 seconds: float) -> tuple[Rate, Rate, float]:
    """Both paths' rates over ROUNDS windows each, and the gateway's CPU seconds over its own windows."""
    await _window(http, gateway, 1.0)  # every connection opened, on both of the gateway's sides
    direct_rates, gateway_rates, cpu = [], [], 0.0
    for _ in range(ROUNDS):
        direct_rates.append(await _window(http, direct, seconds / ROUNDS))
        before = cpu_seconds(gateway_pid)
        gateway_rates.append(await _window(http, gateway, seconds / ROUNDS))
        cpu += cpu_seconds(gateway_pid) - before

    def total(rates: list[Rate]) -> Rate:
        return Rate(sum(r.requests for r in rates), sum(r.seconds for r in rates))

    return total(direct_rates), total(gateway_rates), cpu


def pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` to ``cpu``; threads it starts later inherit it."""
    for thread in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(thread.name), {cpu})


@contextlib.asynccontextmanager
async def gateway_process(rig: Rig, namespace: str, model: str = NAME,
                          timeout: float = START_TIMEOUT) -> AsyncIterator[tuple[str, int]]:
    """`vllm-operator gateway` serving ``namespace``, pinned to this machine's last core, once it routes
    ``model``: its URL and pid."""
    port = free_port()
    log_file = Path(tempfile.mkdtemp(prefix="vllm-operator-bench-gateway-")) / "gateway.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [*as_in_image("gateway"), "--kubeconfig", str(rig.kubeconfig),
             "--namespace", namespace, "--host", "127.0.0.1", "--port", str(port), "--log-format", "text",
             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=operator_env())
    cpu = max(os.sched_getaffinity(0))
    try:
        pin(process.pid, cpu)
        url = f"http://127.0.0.1:{port}"

        async def routable() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited with code {process.returncode}; see {log_file}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with rig.http.get(f"{url}/v1/models") as response:
                    models = (await response.json())["data"] if response.status == 200 else []
                    return any(m["id"] == model and m["ready_replicas"] for m in models)
            return False

        await rig.poll(f"the gateway routing {model}", routable, timeout)
        pin(process.pid, cpu)  # the threads it started meanwhile too
        rig.out(f"  gateway pid {process.pid} on cpu {cpu}, log {log_file}")
        yield url, process.pid
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()


async def _engine_url(rig: Rig, namespace: str) -> str | None:
    """The URL of the Ready engine Pod's simulated engine, once it answers."""
    # The namespace holds one LLMDeployment: its Pods that the gateway routes to.
    found = await rig.kube.request("GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": ENGINE_PODS})
    for pod in found["items"]:
        status: dict[str, Any] = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if ready and status.get("podIP") and not pod["metadata"].get("deletionTimestamp"):
            url = f"http://{status['podIP']}:{ENGINE_PORT}"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with rig.http.get(f"{url}/health") as response:
                    if response.status == 200:
                        return url
    return None


async def _ready(rig: Rig, namespace: str) -> bool:
    found = await rig.kube.get_or_none(llmdeployment_path(namespace, NAME))
    return bool(found and (found.get("status") or {}).get("phase") == "Ready")


async def measure(rig: Rig, size: Size) -> list[Row]:
    async with rig.namespace(NAMESPACE) as namespace:
        manifest = llmdeployment(NAME, namespace)
        manifest["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE}
        await rig.kube.apply_llmdeployment(manifest)
        await rig.poll(f"{NAME} Ready", lambda: _ready(rig, namespace), START_TIMEOUT)
        direct = await rig.poll(f"the engine of {NAME} answering", lambda: _engine_url(rig, namespace), START_TIMEOUT)
        async with gateway_process(rig, namespace) as (gateway, pid), aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CONCURRENCY), timeout=aiohttp.ClientTimeout(total=30)) as http:
            latency = await _taking_turns(http, direct, gateway, _complete, size.gateway_requests)
            rig.out(f"  gateway latency: {latency.result()}; load average {os.getloadavg()[0]:.1f}")
            rate = rate_row(*await _rates(http, direct, gateway, pid, size.gateway_seconds))
            rig.out(f"  gateway rate: {rate.result}; load average {os.getloadavg()[0]:.1f}")
            first_byte = await _taking_turns(http, direct, gateway, _first_byte, size.gateway_requests)
            rig.out(f"  gateway time to first byte: {first_byte.result()}; load average {os.getloadavg()[0]:.1f}")
    return [latency_row(latency), rate, ttfb_row(first_byte)]
