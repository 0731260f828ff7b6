"""Leader election on a coordination.k8s.io/v1 Lease, so that of several replicas only one works.

The holder renews the Lease every retry period. Another replica takes it once it is free, or once
the record has not changed for its lease duration on that replica's own clock, which makes the
election immune to clock skew between replicas (the timestamps in the Lease are never compared).
A holder that cannot renew within the renew deadline stops working, and the renew deadline is
shorter than the lease duration, so it has stopped before anyone else may start. Writes carry the
resourceVersion that was read: when two replicas race, the apiserver lets one win and gives the
other a 409.

A term that ends on its own (its work raised, or returned) ends the campaign: ``run`` releases the
Lease, so that a standby takes over at once, and raises TermEnded for the caller to exit the process.
Kubernetes' own controllers do the same: client-go's OnStoppedLeading exits, and controller-runtime's
manager exits once a runnable fails, releasing the Lease on the way out (ReleaseOnCancel). The failure
was not planned for, so what the term left in memory cannot be trusted; a fresh process starts from
the watched state. Holding on would leave the operator doing nothing, and campaigning again would
repeat the bug unnoticed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from vllm_operator.kube import Kube, KubeError

log = logging.getLogger("vllm_operator.leader")

Spec = Mapping[str, Any]


class TermEnded(Exception):
    """The work run while leading ended on its own; the Lease has been released (if it could be)."""


class Action(enum.Enum):
    ACQUIRE = "acquire"
    RENEW = "renew"
    WAIT = "wait"


@dataclass(frozen=True)
class Observed:
    """The Lease's spec as last read (None: there is no Lease) and the local time it last changed."""

    spec: Spec | None
    since: float


def observe(previous: Observed | None, spec: Spec | None, now: float) -> Observed:
    # Only a change restarts the expiry clock; a holder that stopped renewing leaves the record as it is.
    if previous is not None and previous.spec == spec:
        return previous
    return Observed(spec, now)


def decide(observed: Observed, identity: str, now: float) -> Action:
    spec = observed.spec
    if spec is None or not spec.get("holderIdentity"):
        return Action.ACQUIRE
    if spec["holderIdentity"] == identity:
        return Action.RENEW
    # Our own clock since the record last changed; a missing duration counts as already expired.
    expired = now >= observed.since + (spec.get("leaseDurationSeconds") or 0)
    return Action.ACQUIRE if expired else Action.WAIT


def microtime(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def held_spec(current: Spec | None, identity: str, duration_seconds: int, now: datetime) -> dict[str, Any]:
    """The spec that acquires the Lease for ``identity``, or renews it when it already holds it."""
    stamp = microtime(now)
    if current is not None and current.get("holderIdentity") == identity:
        return {**current, "leaseDurationSeconds": duration_seconds, "renewTime": stamp}
    transitions = 0 if current is None else current.get("leaseTransitions", 0) + 1
    return {"holderIdentity": identity, "leaseDurationSeconds": duration_seconds, "acquireTime": stamp,
            "renewTime": stamp, "leaseTransitions": transitions}


def released_spec(current: Spec, now: datetime) -> dict[str, Any]:
    """Free at once: no holder, and a one-second duration for replicas that read the record before."""
    stamp = microtime(now)
    return {"holderIdentity": "", "leaseDurationSeconds": 1, "acquireTime": stamp, "renewTime": stamp,
            "leaseTransitions": current.get("leaseTransitions", 0)}


def default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"


class LeaderElector:
    def __init__(
        self, kube: Kube, namespace: str, name: str, identity: str, *, lease_duration: float = 15.0,
        renew_deadline: float = 10.0, retry_period: float = 2.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("leader election needs retry period < renew deadline < lease duration")
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._clock = clock
        self._observed: Observed | None = None
        self._lease: dict[str, Any] | None = None  # as last written by this replica
        self._renewed_at = 0.0
        # The term, from when the Lease is won until the term has stopped (not merely been told to).
        self._term: asyncio.Task[None] | None = None
        self._ended: asyncio.Task[None] | None = None  # a term that ended on its own

    @property
    def leading(self) -> bool:
        return self._term is not None

    def fault(self) -> str | None:
        """Why this replica should be restarted (for its liveness probe), or None."""
        if self._ended is not None:
            return "the work run while leading has ended"
        # Past the renew deadline a leader stops its term, so only a term that will not stop keeps it
        # leading longer. Flagged once the lease duration has passed too, as client-go's health check
        # flags an expired lease: from then on another replica may lead while this one still works.
        if self.leading and self._clock() >= self._renewed_at + self.lease_duration:
            return f"still leading {self._clock() - self._renewed_at:.0f}s after the last renewal of the lease"
        return None

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Campaign until cancelled, or until a term ends on its own (TermEnded); ``lead()`` runs as a
        task exactly while this replica holds the Lease."""
        log.info(f"campaigning for lease {self.namespace}/{self.name} as {self.identity}")
        try:
            while self._ended is None:
                await self._round(lead)
                await self._pause()
        finally:
            if self.leading:
                # Stop working first: nothing may be written once a standby can take over.
                failed = self._ended is not None
                await self._stop_leading("its work ended" if failed else "shutting down",
                                         logging.ERROR if failed else logging.INFO)
                await self._release()
        assert self._ended is not None  # the loop ends only so; cancelled, it has raised already
        message = f"the work run while leading lease {self.namespace}/{self.name} ended"
        raise TermEnded(message) from self._ended.exception()

    async def _round(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        now = self._clock()
        if self.leading and now >= self._renewed_at + self.renew_deadline:
            await self._stop_leading(f"no renewal within {self.renew_deadline:g}s")
        budget = self._renewed_at + self.renew_deadline - now if self.leading else self.renew_deadline
        try:
            async with asyncio.timeout(budget):
                held = await self._try_acquire_or_renew(now)
        except (KubeError, TimeoutError) as exc:
            log.warning(f"lease {self.namespace}/{self.name} not read or written: {str(exc) or 'timed out'}")
            return  # a holder keeps working until its renew deadline
        if held:
            self._renewed_at = now
            if not self.leading:
                log.info(f"became the leader (lease {self.namespace}/{self.name})")
                self._term = asyncio.create_task(lead(), name="leader-term")
                self._term.add_done_callback(self._term_done)
        elif self.leading:
            await self._stop_leading("another replica took the lease")

    def _term_done(self, term: asyncio.Task[None]) -> None:
        self._ended = term  # not stopped by _stop_leading, which removes this callback first

    async def _pause(self) -> None:
        if self._term is None:
            await asyncio.sleep(self.retry_period)
            return
        # Wake up no later than the renew deadline, to stop working in time, and at once if the term ends.
        pause = max(0.0, min(self.retry_period, self._renewed_at + self.renew_deadline - self._clock()))
        await asyncio.wait({self._term}, timeout=pause)

    async def _try_acquire_or_renew(self, now: float) -> bool:
        try:
            lease: dict[str, Any] | None = await self.kube.get("Lease", self.namespace, self.name)
        except KubeError as exc:
            if exc.status != 404:
                raise
            lease = None
        previous = self._observed
        self._observed = observe(previous, None if lease is None else lease.get("spec") or {}, now)
        if decide(self._observed, self.identity, now) is Action.WAIT:
            holder = (self._observed.spec or {}).get("holderIdentity")
            if previous is None or (previous.spec or {}).get("holderIdentity") != holder:
                log.info(f"standing by: lease {self.namespace}/{self.name} is held by {holder}")
            return False
        spec = held_spec(self._observed.spec, self.identity, math.ceil(self.lease_duration), datetime.now(timezone.utc))
        try:
            if lease is None:
                written = await self.kube.create(self._manifest(spec))
            else:
                written = await self.kube.replace(self._manifest(spec, lease["metadata"]["resourceVersion"]))
        except KubeError as exc:
            if exc.status == 409:  # another replica wrote first
                return False
            raise
        self._lease = written
        self._observed = Observed(written.get("spec") or {}, now)
        return True

    async def _stop_leading(self, reason: str, level: int = logging.WARNING) -> None:
        assert self._term is not None
        # From here on the term's end is this elector's doing, not a failure of the work.
        self._term.remove_done_callback(self._term_done)
        self._term.cancel()
        # Leading until the term has stopped: one that never does fails the liveness probe.
        await asyncio.gather(self._term, return_exceptions=True)
        self._term = None
        log.log(level, f"stopped leading: {reason}")

    async def _release(self) -> None:
        if self._lease is None:
            return
        try:
            async with asyncio.timeout(self.retry_period):
                try:
                    await self._write_released(self._lease)
                except KubeError as exc:
                    if exc.status != 409:
                        raise
                    # A renewal cancelled in flight may have landed after all: free what is still ours.
                    lease = await self.kube.get("Lease", self.namespace, self.name)
                    if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                        log.info(f"lease {self.namespace}/{self.name} is held by another replica already")
                        return
                    await self._write_released(lease)
        except (KubeError, TimeoutError) as exc:
            # It expires after the lease duration instead.
            log.warning(f"lease {self.namespace}/{self.name} not released: {str(exc) or 'timed out'}")
            return
        log.info(f"released lease {self.namespace}/{self.name}")

    async def _write_released(self, lease: Mapping[str, Any]) -> None:
        spec = released_spec(lease.get("spec") or {}, datetime.now(timezone.utc))
        await self.kube.replace(self._manifest(spec, lease["metadata"]["resourceVersion"]))

    def _manifest(self, spec: Spec, resource_version: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version is not None:
            meta["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}
