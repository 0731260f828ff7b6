"""Leader election: the decisions as pure functions, then electors racing over an in-memory
apiserver that checks resourceVersions as the real one does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import kubernetes
import pytest
from aiohttp import web

from vllm_operator.kube import Credentials, Kube
from vllm_operator.leader import (
    Action, LeaderElector, Observed, decide, held_spec, microtime, observe, released_spec,
)

NOW = datetime(2026, 5, 1, 12, 0, 0, 250000, tzinfo=timezone.utc)
STAMP = "2026-05-01T12:00:00.250000Z"
HELD_BY_B = {"holderIdentity": "b", "leaseDurationSeconds": 15, "acquireTime": "2026-05-01T11:00:00.000000Z",
             "renewTime": "2026-05-01T11:59:58.000000Z", "leaseTransitions": 3}
# Fast enough for tests; the ratios are the defaults' (15, 10, 2).
TIMING = {"lease_duration": 1.5, "renew_deadline": 1.0, "retry_period": 0.1}


# -- decisions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "since", "now", "action"), [
    (None, 0.0, 0.0, Action.ACQUIRE),                                   # no Lease yet: create it
    ({**HELD_BY_B, "holderIdentity": ""}, 100.0, 100.0, Action.ACQUIRE),  # released
    ({**HELD_BY_B, "holderIdentity": "a"}, 100.0, 100.0, Action.RENEW),   # ours
    (HELD_BY_B, 100.0, 114.9, Action.WAIT),                             # b renewed 14.9 s ago, by our clock
    (HELD_BY_B, 100.0, 115.0, Action.ACQUIRE),                          # unchanged for its whole duration
    ({**HELD_BY_B, "leaseDurationSeconds": 1}, 100.0, 101.0, Action.ACQUIRE),  # the record's own duration
])
def test_decide(spec: dict[str, Any] | None, since: float, now: float, action: Action) -> None:
    assert decide(Observed(spec, since), "a", now) is action


def test_expiry_runs_on_the_local_clock_from_the_last_change() -> None:
    # The holder's renewTime is an hour old by its clock; what counts is when this replica saw it change.
    stale = {**HELD_BY_B, "renewTime": "2026-05-01T11:00:00.000000Z"}
    first = observe(None, stale, now=500.0)
    assert decide(first, "a", 500.0) is Action.WAIT
    again = observe(first, dict(stale), now=514.0)
    assert again is first and decide(again, "a", 515.0) is Action.ACQUIRE
    renewed = observe(again, {**stale, "renewTime": "2026-05-01T11:00:02.000000Z"}, now=514.5)
    assert renewed.since == 514.5 and decide(renewed, "a", 515.0) is Action.WAIT


def test_acquiring_counts_a_transition_and_renewing_keeps_the_term() -> None:
    assert held_spec(None, "a", 15, NOW) == {"holderIdentity": "a", "leaseDurationSeconds": 15,
                                             "acquireTime": STAMP, "renewTime": STAMP, "leaseTransitions": 0}
    taken = held_spec(HELD_BY_B, "a", 15, NOW)
    assert taken == {"holderIdentity": "a", "leaseDurationSeconds": 15, "acquireTime": STAMP,
                     "renewTime": STAMP, "leaseTransitions": 4}
    renewed = held_spec(taken, "a", 15, NOW + timedelta(seconds=2))
    assert renewed == {**taken, "renewTime": "2026-05-01T12:00:02.250000Z"}


def test_releasing_frees_the_lease_at_once() -> None:
    assert released_spec(HELD_BY_B, NOW) == {"holderIdentity": "", "leaseDurationSeconds": 1, "acquireTime": STAMP,
                                             "renewTime": STAMP, "leaseTransitions": 3}


def test_microtime_is_utc_with_microseconds() -> None:
    assert microtime(NOW.astimezone(timezone(timedelta(hours=2)))) == STAMP


def test_renew_deadline_must_fall_within_the_lease() -> None:
    kube = Kube(Credentials("http://127.0.0.1:1", False, kubernetes.client.Configuration()))
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        LeaderElector(kube, "ops", "lease", "a", lease_duration=10, renew_deadline=10)


# -- electors over an in-memory apiserver ------------------------------------------------------


class FakeApiserver:
    """Leases in one namespace: 404 for a missing one, 409 for a stale resourceVersion, 503 when down."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.down = False
        self.writes: list[tuple[float, str]] = []  # (time, holder) of every accepted write

    def _store(self, body: dict[str, Any]) -> web.Response:
        self.version += 1
        body["metadata"]["resourceVersion"] = str(self.version)
        self.leases[body["metadata"]["name"]] = body
        self.writes.append((time.monotonic(), body["spec"]["holderIdentity"]))
        return web.json_response(body)

    async def handle(self, request: web.Request) -> web.Response:
        if self.down:
            return web.json_response({"message": "unavailable"}, status=503)
        name = request.match_info.get("name")
        if request.method == "POST":
            body = await request.json()
            if body["metadata"]["name"] in self.leases:
                return web.json_response({"message": "exists", "reason": "AlreadyExists"}, status=409)
            return self._store(body)
        if name not in self.leases:
            return web.json_response({"message": "not found", "reason": "NotFound"}, status=404)
        if request.method == "PUT":
            body = await request.json()
            if body["metadata"].get("resourceVersion") != self.leases[name]["metadata"]["resourceVersion"]:
                return web.json_response({"message": "modified", "reason": "Conflict"}, status=409)
            return self._store(body)
        return web.json_response(self.leases[name])

    def holder(self) -> str | None:
        lease = self.leases.get("lease")
        return None if lease is None else lease["spec"]["holderIdentity"]


@asynccontextmanager
async def apiserver() -> AsyncIterator[tuple[FakeApiserver, Kube]]:
    fake = FakeApiserver()
    app = web.Application()
    leases = "/apis/coordination.k8s.io/v1/namespaces/ops/leases"
    app.router.add_route("*", leases, fake.handle)
    app.router.add_route("*", leases + "/{name}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    kube = Kube(Credentials(f"http://127.0.0.1:{runner.addresses[0][1]}", False, kubernetes.client.Configuration()))
    try:
        yield fake, kube
    finally:
        await kube.close()
        await runner.cleanup()


class Replica:
    """An elector whose term records when it ran."""

    def __init__(self, kube: Kube, identity: str) -> None:
        self.elector = LeaderElector(kube, "ops", "lease", identity, **TIMING)
        self.working = False
        self.ended_at: float | None = None
        self.task: asyncio.Task[None] | None = None

    async def _term(self) -> None:
        self.working = True
        try:
            await asyncio.Event().wait()
        finally:
            self.working, self.ended_at = False, time.monotonic()

    def start(self) -> Replica:
        self.task = asyncio.create_task(self.elector.run(self._term))
        return self

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def until(what: str, probe: Callable[[], bool], timeout: float) -> float:
    """Seconds it took for ``probe`` to hold."""
    started = time.monotonic()
    while not probe():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def leader(kube: Kube) -> Replica:
    """Replica a, alone, once it leads."""
    a = Replica(kube, "a").start()
    await until("a to lead", lambda: a.working, 2)
    return a


def test_one_replica_works_and_a_clean_stop_hands_over_at_once() -> None:
    async def body() -> None:
        async with apiserver() as (fake, kube):
            a = await leader(kube)
            b = Replica(kube, "b").start()
            await asyncio.sleep(3 * TIMING["retry_period"])
            assert fake.holder() == "a" and not b.working
            await a.stop()
            assert fake.holder() == "" and a.ended_at is not None
            # The release came after the term had ended, so the two never overlap.
            assert fake.writes[-1][0] >= a.ended_at
            took = await until("b to take over", lambda: b.working, 2)
            assert took < TIMING["lease_duration"] and fake.holder() == "b"
            assert fake.leases["lease"]["spec"]["leaseTransitions"] == 1
            await b.stop()

    asyncio.run(body())


def test_a_holder_that_died_is_replaced_after_the_lease_duration() -> None:
    async def body() -> None:
        async with apiserver() as (fake, kube):
            # Held by a replica that is gone without releasing, with a renewTime from long ago.
            fake.leases["lease"] = {"metadata": {"name": "lease", "resourceVersion": "1"},
                                    "spec": {**HELD_BY_B, "leaseDurationSeconds": 1}}
            a = Replica(kube, "a").start()
            took = await until("a to take over", lambda: a.working, 3)
            assert took >= 1 - TIMING["retry_period"], took
            assert fake.holder() == "a" and fake.leases["lease"]["spec"]["leaseTransitions"] == 4
            await a.stop()

    asyncio.run(body())


def test_a_leader_cut_off_from_the_apiserver_stops_before_its_lease_expires() -> None:
    async def body() -> None:
        async with apiserver() as (fake, kube):
            a = await leader(kube)
            fake.down = True
            renewed = fake.writes[-1][0]
            await until("a to stop working", lambda: not a.working, 2)
            assert a.ended_at is not None
            assert a.ended_at - renewed < TIMING["lease_duration"]
            fake.down = False
            # Nobody took the Lease meanwhile: a still holds it and resumes.
            await until("a to lead again", lambda: a.working, 2)
            assert fake.holder() == "a"
            await a.stop()

    asyncio.run(body())


def test_a_leader_whose_lease_was_taken_stops_at_once() -> None:
    async def body() -> None:
        async with apiserver() as (fake, kube):
            a = await leader(kube)
            lease = fake.leases["lease"]
            lease["spec"] = {**lease["spec"], "holderIdentity": "intruder"}
            lease["metadata"]["resourceVersion"] = "taken"
            await until("a to stop working", lambda: not a.working, 3 * TIMING["retry_period"] + 0.5)
            assert fake.holder() == "intruder"
            await a.stop()
            assert fake.holder() == "intruder"  # nothing released that was not a's

    asyncio.run(body())
