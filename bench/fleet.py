"""A settled fleet of LLMDeployments whose engines are scraped: API cost while idle and while busy,
the scrape sweep's duration, and the operator's peak memory."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench import metrics
from bench.report import Row
from bench.rig import SCRAPE_INTERVAL, Out, Rig, cpu_seconds, peak_rss_mib, simengines_admin_url
from bench.sizes import Size
from bench.tracker import Tracker
from vllm_operator import api
from vllm_operator.kube import FIELD_MANAGER

# What the operator writes, Events aside; in a settled fleet nothing else writes these.
OPERATOR_RESOURCES = {api.PLURAL, "deployments", "services", "persistentvolumeclaims", "poddisruptionbudgets"}
WRITE_VERBS = {"POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"}
# Watches are left out: the apiserver counts one when it ends, and every informer re-opens its own.
READ_VERBS = {"GET", "LIST"}
SWEEP_METRIC = "vllm_operator_scrape_sweep_duration_seconds"
SWEEP_TARGET_SECONDS = 2.0
RSS_TARGET_MIB = 150.0
SETTLE_TIMEOUT = 900.0


def method(size: Size) -> str:
    span = f"{size.window:g} s"
    return f"""\
The last burst ({size.fleet:,} LLMDeployments, one simulated engine each) stays for these. First every one
must be `Ready` with `status.engine.scrapedReplicas: 1`, and the operator's own write counter must stand
still for two scrape intervals.

**idle cost**: the apiserver's `apiserver_request_total` (its own `/metrics`, which has no user label) is
read before and after {span} of idle engines; the difference on the resources the operator writes
(llmdeployments and their status, deployments, services, persistentvolumeclaims, poddisruptionbudgets)
is scaled to a minute. Nothing else writes those while the fleet is idle, and the benchmark sends nothing
but the reads at both ends of the window. Reads (GET, LIST) are shown too, but they are every client's
(the controller manager's volume controllers resync the claims), while the operator reads only through
its watches. Watches are not counted, as the apiserver counts one when it ends and every
informer in the cluster re-opens its own. Events are
counted apart, as the Events with source `vllm-operator` that appeared in the window, because the scheduler
and the controller manager write Events of their own. The operator's own count of its writes
(`vllm_operator_api_writes_total`) is shown beside it.

**steady traffic**: the simulated engines are switched to busy (their counters grow every second), and the
apiserver's count of writes to `llmdeployments/status` over {span} from the switch is divided by the
fleet size and scaled to a minute. At most one write per LLMDeployment per scrape interval is the target.

**scrape sweep**: the operator's histogram `{SWEEP_METRIC}` over the idle window, one observation per sweep of
every engine's `/health` and `/metrics`. Every sweep is judged, not their mean: the target holds only when
the count in the `le="{SWEEP_TARGET_SECONDS:g}"` bucket equals the histogram's count, and the row says how many
sweeps were over. The mean and the smallest bucket bound that holds every sweep are shown beside. The
simulated engines serve a real 50 KB vLLM `/metrics` body from one process on the same cores.

**memory**: peak resident memory of the operator process (`VmHWM` in `/proc/<pid>/status`) after all of the
above, so it covers the bursts, the settled fleet and the busy window."""


@dataclass(frozen=True)
class Window:
    seconds: float
    requests: metrics.Requests  # apiserver requests served in the window
    operator_events: float
    operator_writes: float
    operator_cpu: float
    sweeps: float
    sweep_seconds: float
    sweep_buckets: dict[float, float]
    scrape_failures: float

    def per_minute(self, count: float) -> float:
        return count * 60 / self.seconds

    def operator_requests(self) -> Counter[str]:
        """Requests on the operator's resources, by verb and resource."""
        found: Counter[str] = Counter()
        for (verb, resource, sub), value in self.requests.items():
            if resource in OPERATOR_RESOURCES:
                found[f"{verb} {resource}{'/' + sub if sub else ''}"] += value
        return found

    def sweeps_over(self, seconds: float) -> float:
        return metrics.over(self.sweep_buckets, self.sweeps, seconds)

    def slowest_sweep_bound(self) -> float:
        if not self.sweeps:
            return float("inf")
        return min((le for le, count in self.sweep_buckets.items() if count >= self.sweeps), default=float("inf"))


async def _snapshot(rig: Rig) -> tuple[float, str, str, float]:
    apiserver = await rig.kube.text("/metrics")
    operator = await rig.get_text(rig.operator.metrics_url)
    return time.monotonic(), apiserver, operator, cpu_seconds(rig.operator_pid)


async def _operator_events(rig: Rig, namespace: str) -> float:
    found = await rig.kube.request("GET", f"/api/v1/namespaces/{namespace}/events",
                                   params={"fieldSelector": f"source={FIELD_MANAGER}"})
    return float(sum(event.get("count") or 1 for event in found["items"]))


async def window(rig: Rig, namespace: str, seconds: float) -> Window:
    events0 = await _operator_events(rig, namespace)
    began, apiserver0, operator0, cpu0 = await _snapshot(rig)
    await asyncio.sleep(seconds)
    ended, apiserver1, operator1, cpu1 = await _snapshot(rig)
    events1 = await _operator_events(rig, namespace)
    before, after = metrics.buckets(operator0, SWEEP_METRIC), metrics.buckets(operator1, SWEEP_METRIC)

    def delta(name: str) -> float:
        return metrics.total(operator1, name) - metrics.total(operator0, name)

    requests = metrics.apiserver_requests(apiserver1)
    requests.subtract(metrics.apiserver_requests(apiserver0))
    return Window(
        seconds=ended - began,
        requests=+requests,
        operator_events=events1 - events0,
        operator_writes=delta("vllm_operator_api_writes_total"),
        operator_cpu=cpu1 - cpu0,
        sweeps=delta(f"{SWEEP_METRIC}_count"),
        sweep_seconds=delta(f"{SWEEP_METRIC}_sum"),
        sweep_buckets={le: after[le] - before.get(le, 0.0) for le in after},
        scrape_failures=delta("vllm_operator_scrape_failures_total"),
    )


def _scraped(resource: dict[str, Any]) -> bool:
    status = resource.get("status") or {}
    return status.get("phase") == "Ready" and (status.get("engine") or {}).get("scrapedReplicas") == 1


async def settle(rig: Rig, tracker: Tracker, count: int) -> None:
    started = time.monotonic()
    await tracker.wait(f"{count} LLMDeployments Ready and scraped",
                       lambda: sum(_scraped(r) for r in tracker.objects.values()) >= count, SETTLE_TIMEOUT)
    rig.out(f"  fleet of {count} Ready and scraped after {time.monotonic() - started:.0f}s")
    quiet_for, last = 2 * SCRAPE_INTERVAL + 1, None
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_for:
        writes = metrics.total(await rig.get_text(rig.operator.metrics_url), "vllm_operator_api_writes_total")
        if writes != last:
            last, quiet_since = writes, time.monotonic()
        await asyncio.sleep(1)


def _per_minute(counts: Counter[str], minutes: float) -> str:
    return ", ".join(f"{what} {value / minutes:.1f}" for what, value in sorted(counts.items())) or "none"


def _idle_row(idle: Window, count: int, out: Out) -> Row:
    requests = idle.operator_requests()
    api_writes = sum(value for what, value in requests.items() if what.split()[0] in WRITE_VERBS)
    writes = api_writes + idle.operator_events
    reads = sum(value for what, value in requests.items() if what.split()[0] in READ_VERBS)
    out(f"  idle: requests/min on the operator's resources: {_per_minute(requests, idle.seconds / 60)}; "
        f"Events by the operator {idle.per_minute(idle.operator_events):.1f}/min; "
        f"operator CPU {idle.per_minute(idle.operator_cpu):.1f} s/min")
    return Row(f"idle cost: API requests/min, {count:,} idle LLMDeployments",
               f"{idle.per_minute(writes):.1f} writes/min, {idle.per_minute(reads):.1f} reads/min by all clients "
               f"(the operator counted {idle.per_minute(idle.operator_writes):.1f} writes/min)",
               "0 writes", writes == 0 and idle.operator_writes == 0)


def _steady_row(busy: Window, count: int, out: Out) -> Row:
    writes = sum(value for (verb, resource, sub), value in busy.requests.items()
                 if resource == api.PLURAL and sub == "status" and verb in WRITE_VERBS)
    per_resource = busy.per_minute(writes) / count
    out(f"  busy: {writes:.0f} status writes in {busy.seconds:.0f}s; "
        f"operator CPU {busy.per_minute(busy.operator_cpu):.1f} s/min")
    limit = 60 / SCRAPE_INTERVAL
    return Row(f"steady traffic: status writes per LLMDeployment per minute, engines busy (scrape every "
               f"{SCRAPE_INTERVAL:g} s)", f"{per_resource:.2f}", f"<= {limit:g}", per_resource <= limit)


def sweep_row(idle: Window, count: int) -> Row:
    mean = idle.sweep_seconds / idle.sweeps if idle.sweeps else float("inf")
    over = idle.sweeps_over(SWEEP_TARGET_SECONDS)
    failures = f", {idle.scrape_failures:.0f} failed scrapes" if idle.scrape_failures else ""
    return Row(f"scrape sweep of {count:,} endpoints",
               f"{over:.0f} of {idle.sweeps:.0f} sweeps over {SWEEP_TARGET_SECONDS:g} s; mean {mean:.2f} s, "
               f"each <= {idle.slowest_sweep_bound():g} s{failures}",
               f"every sweep <= {SWEEP_TARGET_SECONDS:g} s", idle.sweeps > 0 and over == 0 and not idle.scrape_failures)


async def measure(rig: Rig, tracker: Tracker, namespace: str, size: Size) -> list[Row]:
    count = size.fleet
    await settle(rig, tracker, count)
    idle = await window(rig, namespace, size.window)
    admin = simengines_admin_url(rig.kubeconfig)
    await rig.post(f"{admin}/mode/busy")
    try:
        busy = await window(rig, namespace, size.window)
    finally:
        await rig.post(f"{admin}/mode/idle")
    peak = peak_rss_mib(rig.operator_pid)
    return [
        _idle_row(idle, count, rig.out),
        _steady_row(busy, count, rig.out),
        sweep_row(idle, count),
        Row(f"operator peak RSS, {count:,} LLMDeployments and scraped endpoints", f"{peak:.0f} MiB",
            f"<= {RSS_TARGET_MIB:g} MiB", peak <= RSS_TARGET_MIB),
    ]
