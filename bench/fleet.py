"""A settled fleet of LLMDeployments whose engines are scraped: the Events that brought it up, API cost while
idle and while busy, how fresh its status is, the scrape sweep's duration, and the operator's peak memory."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from bench import freshness, metrics
from bench.kube import Obj
from bench.report import Row
from bench.rig import SCRAPE_INTERVAL, Out, Rig, cpu_seconds, peak_rss_mib
from devcluster.simengines import admin_url as simengines_admin_url
from bench.sizes import Size
from bench.tracker import Tracker
from vllm_operator import api
from vllm_operator.kube import FIELD_MANAGER
from vllm_operator.reconcile.controller import STATUS_MIN_INTERVAL_SECONDS

# What the operator writes, Events aside; in a settled fleet nothing else writes these.
OPERATOR_RESOURCES = {api.PLURAL, "deployments", "services", "persistentvolumeclaims", "poddisruptionbudgets"}
WRITE_VERBS = {"POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"}
# Watches are left out: the apiserver counts one when it ends, and every informer re-opens its own.
READ_VERBS = {"GET", "LIST"}
SWEEP_METRIC = "vllm_operator_scrape_sweep_duration_seconds"
SWEEP_TARGET_SECONDS = 2.0
RSS_TARGET_MIB = 120.0
# A new LLMDeployment that comes up: its children created, then Ready.
EVENTS_TARGET = 2.0
# Engine figures are written at most once per interval, so a minute holds at most this many status writes.
STEADY_TARGET = 60 / STATUS_MIN_INTERVAL_SECONDS
SETTLE_TIMEOUT = 900.0
DEFERRED_METRIC = "vllm_operator_status_writes_deferred_total"
WRITES_METRIC = "vllm_operator_api_writes_total"
STATUS_KIND = "LLMDeployment/status"


def method(size: Size) -> str:
    span = f"{size.window:g} s"
    return f"""\
The last burst ({size.fleet:,} LLMDeployments, one simulated engine each) stays for these. First every one
must be `Ready` with `status.engine.scrapedReplicas: 1`, and the operator's own write counter must stand
still for two scrape intervals.

**Events per new LLMDeployment**: the Events with source `vllm-operator` in the fleet's namespace once it has
settled (each counted `count` times), divided by the fleet size: everything the operator told people while
{size.fleet:,} new LLMDeployments came up to `Ready`.

**another writer**: the benchmark runs the operator on its own namespaces only (`--namespace`). From the idle
window to the phase change below, its watch counts the new versions of the fleet's LLMDeployments; more than the
operator's own count of its status writes (`{WRITES_METRIC}`, kind `{STATUS_KIND}`) means another client wrote them
too (on a shared cluster, a second operator serving every namespace), and every row measured in that span fails,
marked invalid.

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

**steady traffic**: the simulated engines are switched to busy (their counters grow every second), and once every
LLMDeployment's status shows it, the operator's own count of its status writes (`{WRITES_METRIC}`, kind
`{STATUS_KIND}`) over the next {span} is divided by the fleet size and scaled to a minute: it counts the fleet's
writes alone, where the apiserver's counts are the whole cluster's. The operator runs with its default
`--status-min-interval` of {STATUS_MIN_INTERVAL_SECONDS:g} s, so the target is at most one write per LLMDeployment
per interval, whatever the scrape interval. The rates the operator derives from the engines' counters wobble from
scrape to scrape (the counters grow once a second, the scrapes come every {SCRAPE_INTERVAL:g} s), so this is busy
traffic whose figures move, not a fleet standing still.

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
    status_writes: float  # the operator's, of LLMDeployment status
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


def own_status_writes(operator_metrics: str) -> float:
    return sum(value for labels, value in metrics.samples(operator_metrics, WRITES_METRIC)
               if labels["kind"] == STATUS_KIND)


async def _snapshot(rig: Rig) -> tuple[float, str, str, float]:
    apiserver = await rig.kube.text("/metrics")
    operator = await rig.get_text(rig.operator.metrics_url)
    return time.monotonic(), apiserver, operator, cpu_seconds(rig.operator_pid)


async def operator_events(rig: Rig, namespace: str) -> Counter[str]:
    """The operator's Events in ``namespace`` by reason, each as often as it was counted."""
    found = await rig.kube.request("GET", f"/api/v1/namespaces/{namespace}/events",
                                   params={"fieldSelector": f"source={FIELD_MANAGER}"})
    reasons: Counter[str] = Counter()
    for event in found["items"]:
        reasons[event.get("reason") or ""] += event.get("count") or 1
    return reasons


async def window(rig: Rig, namespace: str, seconds: float) -> Window:
    events0 = (await operator_events(rig, namespace)).total()
    began, apiserver0, operator0, cpu0 = await _snapshot(rig)
    await asyncio.sleep(seconds)
    ended, apiserver1, operator1, cpu1 = await _snapshot(rig)
    events1 = (await operator_events(rig, namespace)).total()
    before, after = metrics.buckets(operator0, SWEEP_METRIC), metrics.buckets(operator1, SWEEP_METRIC)

    def delta(name: str) -> float:
        return metrics.total(operator1, name) - metrics.total(operator0, name)

    requests = metrics.apiserver_requests(apiserver1)
    requests.subtract(metrics.apiserver_requests(apiserver0))
    return Window(
        seconds=ended - began,
        requests=+requests,
        operator_events=events1 - events0,
        operator_writes=delta(WRITES_METRIC),
        status_writes=own_status_writes(operator1) - own_status_writes(operator0),
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


def _divided(counts: Counter[str], by: float) -> str:
    return ", ".join(f"{what} {value / by:.1f}" for what, value in sorted(counts.items())) or "none"


def _idle_row(idle: Window, count: int, out: Out) -> Row:
    requests = idle.operator_requests()
    api_writes = sum(value for what, value in requests.items() if what.split()[0] in WRITE_VERBS)
    writes = api_writes + idle.operator_events
    reads = sum(value for what, value in requests.items() if what.split()[0] in READ_VERBS)
    out(f"  idle: requests/min on the operator's resources: {_divided(requests, idle.seconds / 60)}; "
        f"Events by the operator {idle.per_minute(idle.operator_events):.1f}/min; "
        f"operator CPU {idle.per_minute(idle.operator_cpu):.1f} s/min")
    return Row(f"idle cost: API requests/min, {count:,} idle LLMDeployments",
               f"{idle.per_minute(writes):.1f} writes/min, {idle.per_minute(reads):.1f} reads/min by all clients "
               f"(the operator counted {idle.per_minute(idle.operator_writes):.1f} writes/min)",
               "0 writes", writes == 0 and idle.operator_writes == 0)


def events_row(reasons: Counter[str], count: int) -> Row:
    per_resource = reasons.total() / count
    return Row(f"Events per new LLMDeployment, {count:,} created and Ready",
               f"{per_resource:.2f} ({_divided(reasons, count)})", f"<= {EVENTS_TARGET:g}",
               per_resource <= EVENTS_TARGET)


def steady_row(busy: Window, count: int) -> Row:
    per_resource = busy.per_minute(busy.status_writes) / count
    return Row(f"steady traffic: status writes per LLMDeployment per minute, engines busy (scrape every "
               f"{SCRAPE_INTERVAL:g} s, status min interval {STATUS_MIN_INTERVAL_SECONDS:g} s)",
               f"{per_resource:.2f}", f"<= {STEADY_TARGET:g}", per_resource <= STEADY_TARGET)


def another_writer(rows: list[Row], changes_seen: float, written: float) -> list[Row]:
    """Rows measured while the watch saw more changes of the fleet than the operator wrote: some other client
    (a second operator serving every namespace of a shared cluster) wrote too, so they are failed, saying so."""
    foreign = changes_seen - written
    if foreign <= 0:
        return rows
    return [replace(row, result=f"{row.result}; invalid: {foreign:.0f} changes by another writer", passed=False)
            for row in rows]


@contextlib.contextmanager
def new_versions(tracker: Tracker) -> Iterator[Counter[str]]:
    """New versions of each LLMDeployment the watch delivers meanwhile, by name (a list again repeats none)."""
    versions = {name: llmd["metadata"]["resourceVersion"] for name, llmd in tracker.objects.items()}
    seen: Counter[str] = Counter()

    def listen(name: str, llmd: Obj, _arrived: float) -> None:
        version = llmd["metadata"]["resourceVersion"]
        if versions.get(name) != version:
            versions[name] = version
            seen[name] += 1

    with freshness.listening(tracker, listen):
        yield seen


def sweep_row(idle: Window, count: int) -> Row:
    mean = idle.sweep_seconds / idle.sweeps if idle.sweeps else float("inf")
    over = idle.sweeps_over(SWEEP_TARGET_SECONDS)
    failures = f", {idle.scrape_failures:.0f} failed scrapes" if idle.scrape_failures else ""
    return Row(f"scrape sweep of {count:,} endpoints",
               f"{over:.0f} of {idle.sweeps:.0f} sweeps over {SWEEP_TARGET_SECONDS:g} s; mean {mean:.2f} s, "
               f"each <= {idle.slowest_sweep_bound():g} s{failures}",
               f"every sweep <= {SWEEP_TARGET_SECONDS:g} s", idle.sweeps > 0 and over == 0 and not idle.scrape_failures)


async def _busy(rig: Rig, tracker: Tracker, namespace: str, size: Size) -> list[Row]:
    """Switches of load with the steady-traffic window after the first, then the phase change after the last."""
    deferred = metrics.samples(await rig.get_text(rig.operator.metrics_url), DEFERRED_METRIC)
    switches = [await freshness.switch(rig, tracker, to_busy=True)]
    busy = await window(rig, namespace, size.window)
    # Each switch as soon as the fleet shows the one before: just after its figures were written.
    for to_busy in (False, True, False):
        switches.append(await freshness.switch(rig, tracker, to_busy))
    phase = await freshness.phase_change(rig, tracker, namespace, switches[-1])
    after = metrics.samples(await rig.get_text(rig.operator.metrics_url), DEFERRED_METRIC)
    put_off = Counter({labels["reason"]: value for labels, value in after})
    put_off.subtract({labels["reason"]: value for labels, value in deferred})
    rig.out(f"  busy: {busy.status_writes:.0f} status writes in {busy.seconds:.0f}s, operator CPU "
            f"{busy.per_minute(busy.operator_cpu):.1f} s/min; figure writes put off since the first switch, by "
            f"reason: {dict(+put_off) or 'none'}")
    return [steady_row(busy, size.fleet), freshness.staleness_row(switches), phase.row()]


async def measure(rig: Rig, tracker: Tracker, namespace: str, size: Size) -> list[Row]:
    count = size.fleet
    await settle(rig, tracker, count)
    reasons = await operator_events(rig, namespace)
    rig.out(f"  Events by the operator while the fleet came up: {dict(reasons)}")
    written = own_status_writes(await rig.get_text(rig.operator.metrics_url))
    with new_versions(tracker) as changes:
        idle = await window(rig, namespace, size.window)
        try:
            rows = await _busy(rig, tracker, namespace, size)
        finally:
            await rig.post(f"{simengines_admin_url(rig.kubeconfig)}/mode/idle")
    written = own_status_writes(await rig.get_text(rig.operator.metrics_url)) - written
    rig.out(f"  the operator wrote {written:.0f} statuses of the fleet, the watch saw {changes.total()} changes")
    peak = peak_rss_mib(rig.operator_pid)
    return [
        *another_writer([events_row(reasons, count), _idle_row(idle, count, rig.out), *rows], changes.total(), written),
        sweep_row(idle, count),
        Row(f"operator peak RSS, {count:,} LLMDeployments and scraped endpoints", f"{peak:.0f} MiB",
            f"<= {RSS_TARGET_MIB:g} MiB", peak <= RSS_TARGET_MIB),
    ]
