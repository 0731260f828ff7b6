"""How soon an LLMDeployment's status shows what changed: engine load, which the operator's status write
policy paces (reconcile/writes.py), and phase, which it writes at once however recently it wrote figures."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

from bench.kube import Obj
from bench.report import Row
from bench.rig import SCRAPE_INTERVAL, Rig
from devcluster.simengines import admin_url as simengines_admin_url
from bench.sizes import Size
from bench.tracker import Tracker
from vllm_operator.reconcile.controller import STATUS_MIN_INTERVAL_SECONDS, STATUS_WRITES_PER_SECOND, now_rfc3339
from vllm_operator.reconcile.writes import BANDS
from vllm_operator.render.manifests import SELECTOR_LABEL

# The figure a switch of the simulated engines' load moves: zero while they idle, not while they are busy.
FIGURE = "generationTokensPerSecond"
# The rig runs the operator at its default interval, and these targets follow it.
STALENESS_TARGET = STATUS_MIN_INTERVAL_SECONDS + SCRAPE_INTERVAL
PHASE_TARGET = SCRAPE_INTERVAL
# LLMDeployments whose Pod is taken out of Ready, the ones whose figures were written last.
PHASE_SAMPLES = 10
RESTORE_TIMEOUT = 120.0


def method(size: Size) -> str:
    return f"""\
**staleness of the engine figures**: the simulated engines' load is switched fleet-wide four times: to busy after
the idle window, to idle after the steady-traffic window, then to busy and to idle again, each as soon as every
LLMDeployment's status shows the switch before, so that it falls just after their last figures were written, inside
the operator's `--status-min-interval` ({STATUS_MIN_INTERVAL_SECONDS:g} s, its default; figure writes are also
shared at {STATUS_WRITES_PER_SECOND:g} a second fleet-wide). For each LLMDeployment and switch, the time from the
switch until the benchmark's watch on the LLMDeployments delivers a status whose `engine.{FIGURE}` moved out of the
operator's own dead band around the value it showed at the switch, the way of the switch (from or to zero always
does); `status.engine.observedAt` is when the operator computed that status. The p95 over every LLMDeployment and
switch is judged against the interval plus one scrape interval. An LLMDeployment whose status never shows a switch
within three times that bound (plus the time the write budget needs for the fleet) fails the row.

**phase change inside the interval**: right after the last switch, the Pods of the {PHASE_SAMPLES} LLMDeployments
whose figures were written last are taken out of `Ready` (their Ready condition set to False, as a failing readiness
probe does; a deleted Pod is no use here: kwok replaces it with a Ready one so fast that the status never leaves
`Ready`). Timed from that status patch until the watch delivers a status whose `phase` is no longer `Ready`; every one
must arrive within one scrape interval, although each LLMDeployment's figures were written less than the interval
before. The Pods are then made Ready again."""


def change_timeout(pending: int) -> float:
    """How long a switch may take to show on ``pending`` LLMDeployments before the rest count as unseen."""
    return 3 * STALENESS_TARGET + pending / STATUS_WRITES_PER_SECOND


def shown_load(llmd: Obj) -> float | None:
    """The figure a load switch moves, as the status shows it; None before the engines were scraped."""
    value = ((llmd.get("status") or {}).get("engine") or {}).get(FIGURE)
    return None if value is None else float(value)


def shows_switch(before: float, now: float, to_busy: bool) -> bool:
    """Whether a status showing ``now`` where it showed ``before`` at the switch shows that switch: moved
    out of the operator's dead band the way of the switch."""
    towards = now > before if to_busy else now < before
    return towards and BANDS[FIGURE].moved(before, now)


def nearest_rank(samples: Collection[float], share: float) -> float:
    """The smallest sample with at least ``share`` of the samples at or below it; inf without samples."""
    if not samples:
        return math.inf
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


@dataclass(frozen=True)
class Switch:
    """One fleet-wide switch of load and, per LLMDeployment, when its status showed it."""

    to_busy: bool
    at: float  # monotonic, just before the switch was sent
    pending: int  # LLMDeployments with figures at the switch
    shown_at: Mapping[str, float]  # name -> arrival of the first status that showed the switch

    @property
    def delays(self) -> list[float]:
        return [arrived - self.at for arrived in self.shown_at.values()]

    @property
    def unseen(self) -> int:
        return self.pending - len(self.shown_at)

    def last_shown(self, count: int) -> list[str]:
        """The ``count`` LLMDeployments whose status showed the switch last."""
        return sorted(self.shown_at, key=self.shown_at.__getitem__)[-count:]

    def summary(self) -> str:
        delays = self.delays
        return (f"to {'busy' if self.to_busy else 'idle'}: {len(delays)} of {self.pending} shown, "
                f"p50 {nearest_rank(delays, 0.5):.1f} s, p95 {nearest_rank(delays, 0.95):.1f} s, "
                f"max {max(delays, default=math.inf):.1f} s")


def staleness_row(switches: list[Switch]) -> Row:
    delays = [delay for switch in switches for delay in switch.delays]
    unseen = sum(switch.unseen for switch in switches)
    p95 = nearest_rank(delays, 0.95)
    missing = f"; {unseen} never shown" if unseen else ""
    return Row(f"staleness of engine figures in status after a load change, p95 ({len(switches)} switches, "
               f"{len(delays) + unseen:,} changes)",
               f"p95 {p95:.1f} s, p50 {nearest_rank(delays, 0.5):.1f} s, max {max(delays, default=math.inf):.1f} s"
               f"{missing}",
               f"<= {STALENESS_TARGET:g} s (min interval {STATUS_MIN_INTERVAL_SECONDS:g} s + scrape "
               f"{SCRAPE_INTERVAL:g} s)",
               bool(delays) and unseen == 0 and p95 <= STALENESS_TARGET)


@contextlib.contextmanager
def listening(tracker: Tracker, listener: Callable[[str, Obj, float], None]) -> Iterator[None]:
    """``listener`` sees every LLMDeployment the tracker's watch delivers meanwhile."""
    tracker.listeners.append(listener)
    try:
        yield
    finally:
        tracker.listeners.remove(listener)


async def switch(rig: Rig, tracker: Tracker, to_busy: bool) -> Switch:
    """Switch every simulated engine's load and wait until each LLMDeployment's status shows it."""
    before = {name: load for name, llmd in tracker.objects.items() if (load := shown_load(llmd)) is not None}
    shown_at: dict[str, float] = {}

    def listen(name: str, llmd: Obj, arrived: float) -> None:
        load = shown_load(llmd)
        if name in before and name not in shown_at and load is not None and shows_switch(before[name], load, to_busy):
            shown_at[name] = arrived

    with listening(tracker, listen):
        at = time.monotonic()
        await rig.post(f"{simengines_admin_url(rig.kubeconfig)}/mode/{'busy' if to_busy else 'idle'}")
        with contextlib.suppress(TimeoutError):
            await tracker.wait(f"every status showing the switch to {'busy' if to_busy else 'idle'}",
                               lambda: len(shown_at) >= len(before), change_timeout(len(before)))
    done = Switch(to_busy, at, len(before), dict(shown_at))
    rig.out(f"  switch {done.summary()}")
    return done


@dataclass(frozen=True)
class PhaseChange:
    after_write: list[float]  # seconds from the figures write each change followed to the change
    delays: list[float]  # change -> status with another phase, per LLMDeployment that showed one
    unseen: int

    def row(self) -> Row:
        slowest = max(self.delays, default=math.inf)
        latest = max(self.after_write, default=math.inf)
        missing = f"; {self.unseen} never shown" if self.unseen else ""
        return Row(f"phase change inside the status min interval: Pod out of Ready -> phase in status, max of "
                   f"{len(self.after_write)}",
                   f"max {slowest:.1f} s, p50 {nearest_rank(self.delays, 0.5):.1f} s; changed <= {latest:.1f} s "
                   f"after a figures write{missing}",
                   f"<= {PHASE_TARGET:g} s (one scrape interval)",
                   bool(self.delays) and self.unseen == 0 and slowest <= PHASE_TARGET
                   and latest < STATUS_MIN_INTERVAL_SECONDS)


def _phase(llmd: Obj) -> str | None:
    return (llmd.get("status") or {}).get("phase")


async def _engine_pod(rig: Rig, namespace: str, name: str) -> str:
    found = await rig.kube.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                                   params={"labelSelector": f"{SELECTOR_LABEL}={name}"})
    live = [pod["metadata"]["name"] for pod in found["items"] if not pod["metadata"].get("deletionTimestamp")]
    if len(live) != 1:
        raise RuntimeError(f"LLMDeployment {name} has {len(live)} engine Pods, not 1")
    return live[0]


async def _set_ready(rig: Rig, namespace: str, pod: str, ready: bool) -> None:
    """The Pod's Ready condition, as the kubelet sets it from a readiness probe (kwok leaves a Running Pod's alone)."""
    condition = {"type": "Ready", "status": str(ready), "reason": "" if ready else "BenchReadinessProbeFailed",
                 "lastTransitionTime": now_rfc3339()}
    await rig.kube.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod}/status",
                           body={"status": {"conditions": [condition]}},
                           content_type="application/strategic-merge-patch+json")


async def phase_change(rig: Rig, tracker: Tracker, namespace: str, last: Switch) -> PhaseChange:
    """Take the Pods of the LLMDeployments written last out of Ready; time until their status says so; restore."""
    names = last.last_shown(PHASE_SAMPLES)
    pods = {name: await _engine_pod(rig, namespace, name) for name in names}
    changed_at: dict[str, float] = {}
    left_at: dict[str, float] = {}

    def listen(name: str, llmd: Obj, arrived: float) -> None:
        if name in changed_at and name not in left_at and _phase(llmd) != "Ready":
            left_at[name] = arrived

    with listening(tracker, listen):
        for name in names:
            changed_at[name] = time.monotonic()
            await _set_ready(rig, namespace, pods[name], False)
        with contextlib.suppress(TimeoutError):
            await tracker.wait("every status showing its Pod out of Ready", lambda: len(left_at) >= len(names),
                               4 * PHASE_TARGET + 10)
    for name in names:
        await _set_ready(rig, namespace, pods[name], True)
    await tracker.wait("the Pods taken out of Ready back in the status",
                       lambda: all(_phase(tracker.objects[name]) == "Ready" for name in names), RESTORE_TIMEOUT)
    measured = PhaseChange([changed_at[name] - last.shown_at[name] for name in names],
                           [left_at[name] - changed_at[name] for name in left_at], len(names) - len(left_at))
    rig.out(f"  phase change: {len(measured.delays)} of {len(names)} shown, p50 "
            f"{nearest_rank(measured.delays, 0.5):.2f} s, max {max(measured.delays, default=math.inf):.2f} s")
    return measured
