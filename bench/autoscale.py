"""The built-in autoscaler: how soon a queue brings new engine Pods on the cluster, what its decisions cost per
scrape sweep at fleet size, and how often it scales under steady and oscillating load (never, is the target)."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from bench.kube import Obj, llmdeployment_path
from bench.report import Row, times
from bench.rig import SCRAPE_INTERVAL, Rig, llmdeployment
from bench.sizes import Size
from devcluster.simengines import admin_url as simengines_admin_url
from vllm_operator.api import AutoscalingSpec
from vllm_operator.autoscale.decide import WINDOW_SECONDS, Autoscaler
from vllm_operator.autoscale.simulate import Load, Simulation, sample
from vllm_operator.render.manifests import SELECTOR_LABEL

NAMESPACE = "bench-autoscale"
NAME = "autoscaled"
PER_REPLICA = 10  # waiting requests each replica should take
STEP = 4 * PER_REPLICA  # the queue a load step puts on the engine: asks for 4 replicas
IDLE = {"vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0, "vllm:kv_cache_usage_perc": 0.0}
# The acceptance bound: a step reaches its replica count within two decision windows.
REACTION_TARGET = 2 * WINDOW_SECONDS
# The decisions of a sweep must stay a small part of the sweep's own 2 s target.
DECISION_SHARE_TARGET = 0.05
SWEEP_TARGET_SECONDS = 2.0
DECISION_SWEEPS = 40
HOUR = 3600.0
SETTLE = 600.0  # the first minutes bring the count to the load; the hour after them is counted
POLL_SECONDS = 0.25
TIMEOUT = 300.0


def method(size: Size) -> str:
    return f"""\
**autoscaler reaction**: one LLMDeployment on the benchmark's node with `autoscaling` (1 to 4 replicas,
`waitingRequests` {PER_REPLICA} per replica, a `ReadWriteMany` cache) and its simulated engine idle; then the engine
reports {STEP} waiting requests (the simulated engines' per-engine load), and the time until 4 engine Pods exist
is taken, polled every {POLL_SECONDS:g} s, {times(size.autoscale_steps)}, back to 1 replica in between. The operator
scrapes every {SCRAPE_INTERVAL:g} s; decisions average a {WINDOW_SECONDS:g} s window, and one may at most double the
replicas that exist, so 1 -> 2 -> 4. Target: within two windows.

**autoscaler decisions per sweep**: {size.fleet:,} `Autoscaler`s (the operator's own class, default behaviour,
`requestsPerReplica` 16) each observe a random sample and decide, {DECISION_SWEEPS} sweeps in a row in this process;
the CPU time (`time.process_time`) of a sweep's decisions against the scrape sweep's {SWEEP_TARGET_SECONDS:g} s
target, which the sweep row measures on the live fleet.

**scale changes per hour**: the operator's decisions driven through an hour of simulated time
(`vllm_operator.autoscale.simulate`: a scrape every 15 s, Pods that serve 30 s after they are created) after
{SETTLE / 60:g} minutes to settle, default behaviour: steady load with noise (24 to 48 requests around 3
replicas' worth), and load that swings between 40 and 4 requests every 2 minutes, inside the 300 s scale-down
window."""


async def _pods(rig: Rig, namespace: str) -> list[Obj]:
    found = await rig.kube.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                                   params={"labelSelector": f"{SELECTOR_LABEL}={NAME}"})
    return [pod for pod in found["items"] if not pod["metadata"].get("deletionTimestamp")]


async def _set_load(rig: Rig, ip: str, gauges: dict[str, float]) -> None:
    async with rig.http.put(f"{simengines_admin_url(rig.kubeconfig)}/engines/{ip}/load", json=gauges) as response:
        response.raise_for_status()


async def _loaded(rig: Rig, namespace: str, first: dict[str, float]) -> int:
    """The oldest engine reports ``first``, the others idle (replicas added meanwhile too); how many exist."""
    pods = sorted(await _pods(rig, namespace), key=lambda pod: pod["metadata"]["creationTimestamp"])
    for index, pod in enumerate(pods):
        if ip := (pod.get("status") or {}).get("podIP"):
            await _set_load(rig, ip, first if index == 0 else IDLE)
    return len(pods)


def _manifest(namespace: str) -> Obj:
    manifest = llmdeployment(NAME, namespace)
    manifest["spec"]["cache"]["accessMode"] = "ReadWriteMany"
    manifest["spec"]["autoscaling"] = {
        "minReplicas": 1, "maxReplicas": 4, "targets": [{"metric": "waitingRequests", "value": PER_REPLICA}],
        "behavior": {"scaleDownStabilizationSeconds": 0, "scaleDownDelaySeconds": 0}}
    return manifest


async def _ready(rig: Rig, namespace: str) -> bool:
    found = await rig.kube.get_or_none(llmdeployment_path(namespace, NAME))
    return bool(found and (found.get("status") or {}).get("phase") == "Ready")


async def reaction(rig: Rig, size: Size) -> Row:
    busy = {**IDLE, "vllm:num_requests_waiting": float(STEP)}
    took: list[float] = []
    async with rig.namespace(NAMESPACE) as namespace:
        await rig.kube.apply_llmdeployment(_manifest(namespace))
        await rig.poll(f"{NAME} Ready", lambda: _ready(rig, namespace), TIMEOUT)
        for _ in range(size.autoscale_steps):
            await rig.poll("one idle replica", lambda: _idle_at(rig, namespace, 1), TIMEOUT, POLL_SECONDS)
            started = time.monotonic()
            await rig.poll("4 engine Pods", lambda: _busy_at(rig, namespace, busy, 4), TIMEOUT, POLL_SECONDS)
            took.append(time.monotonic() - started)
            rig.out(f"  autoscaler reaction: {took[-1]:.1f}s")
    median = statistics.median(took)
    return Row(f"autoscaler reaction: {STEP} waiting requests to 4 engine Pods created, median of {len(took)}",
               f"{median:.1f} s (max {max(took):.1f} s)", f"<= {REACTION_TARGET:g} s", median <= REACTION_TARGET)


async def _idle_at(rig: Rig, namespace: str, count: int) -> bool:
    return await _loaded(rig, namespace, IDLE) == count


async def _busy_at(rig: Rig, namespace: str, busy: dict[str, float], count: int) -> bool:
    return await _loaded(rig, namespace, busy) >= count


def decision_cpu(size: Size) -> Row:
    spec = AutoscalingSpec.model_validate({"maxReplicas": 8})
    scalers = [Autoscaler(spec) for _ in range(size.fleet)]
    noise = random.Random(22)
    spent = 0.0
    for sweep in range(DECISION_SWEEPS):
        now = sweep * SCRAPE_INTERVAL
        samples = [sample(now, 2, requests_running=noise.randint(0, 48)) for _ in scalers]
        started = time.process_time()
        for scaler, load in zip(scalers, samples):
            scaler.observe(load)
            scaler.decide(2, 2, now)
        spent += time.process_time() - started
    per_sweep = spent / DECISION_SWEEPS
    share = per_sweep / SWEEP_TARGET_SECONDS
    return Row(f"autoscaler decisions per sweep, {size.fleet:,} autoscaled LLMDeployments (CPU)",
               f"{1000 * per_sweep:.1f} ms ({100 * share:.1f}% of the {SWEEP_TARGET_SECONDS:g} s sweep target)",
               f"<= {100 * DECISION_SHARE_TARGET:g}% of the sweep target", share <= DECISION_SHARE_TARGET)


def _changes_in_an_hour(replicas: int, load: Load) -> int:
    simulation = Simulation(AutoscalingSpec.model_validate({"maxReplicas": 8}), replicas=replicas)
    simulation.run(SETTLE + HOUR, load)
    return sum(1 for at, _old, _new in simulation.changes if at >= SETTLE)


def scale_changes() -> list[Row]:
    noise = random.Random(15)
    loads: dict[str, Any] = {
        "steady": lambda _t: {"requests_running": noise.randint(24, 48)},
        "oscillating": lambda t: {"requests_running": 40 if t % 240 < 120 else 4},
    }
    rows = []
    for name, load in loads.items():
        changes = _changes_in_an_hour(1, load)
        rows.append(Row(f"autoscaler scale changes per hour, {name} load (simulated hour)", f"{changes}", "0",
                        changes == 0))
    return rows
