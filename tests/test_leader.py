"""Leader election: the decisions as pure functions, then electors racing over the local cluster's
real apiserver, which settles their races with resourceVersions, then the operator's own term: a
failed one hands over and stops the operator, and an ended one leaves no leader-only metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import kopf
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from devcluster.operatorproc import operator_env
from devcluster.pytest_plugin import Cluster
from vllm_operator import handlers, observability
from vllm_operator.handlers import RunOptions
from vllm_operator.kube import Credentials, Kube, object_path
from vllm_operator.leader import (
    Action, LeaderElector, Observed, TermEnded, decide, held_spec, microtime, observe, released_spec,
)
from vllm_operator.reconcile.controller import Controller

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
    kube = Kube(Credentials("http://127.0.0.1:1", False))
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        LeaderElector(kube, "ops", "lease", "a", lease_duration=10, renew_deadline=10)


# -- electors over the real apiserver -------------------------------------------------------------

LEASE = "lease"
Lease = dict[str, Any]


@pytest.fixture
def credentials(cluster: Cluster) -> Credentials:
    return Credentials.load(str(cluster.kubeconfig))


@asynccontextmanager
async def connected(credentials: Credentials) -> AsyncIterator[Kube]:
    """A Kube closed on the event loop it ran on."""
    kube = Kube(credentials)
    try:
        yield kube
    finally:
        await kube.close()


async def lease(kube: Kube, namespace: str) -> Lease:
    return await kube.get("Lease", namespace, LEASE)


def renewed(version: Lease) -> float:
    """The renewTime the writer stamped (wall clock) just before sending, so no later than the write landed."""
    stamp = datetime.strptime(version["spec"]["renewTime"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=timezone.utc).timestamp()


class Versions:
    """Every version of the Lease in the order the apiserver accepted it, as a watch delivers them."""

    def __init__(self) -> None:
        self.seen: list[Lease] = []

    async def follow(self, stream: aiohttp.StreamReader) -> None:
        async for line in stream:
            self.seen.append(json.loads(line)["object"])

    async def through(self, last: Lease) -> list[Lease]:
        """The versions up to ``last``, once the watch has delivered it."""
        version = last["metadata"]["resourceVersion"]

        def versions() -> list[str]:
            return [seen["metadata"]["resourceVersion"] for seen in self.seen]

        await until(f"the watch to deliver version {version}", lambda: version in versions(), 2)
        return self.seen[:versions().index(version) + 1]


@asynccontextmanager
async def watched(credentials: Credentials, namespace: str) -> AsyncIterator[Versions]:
    """Versions of the Lease from now on: the watch starts at a List's resourceVersion, so none is missed."""
    versions = Versions()
    path = object_path("Lease", namespace)
    async with aiohttp.ClientSession(
        credentials.host, connector=aiohttp.TCPConnector(ssl=credentials.ssl_context), headers=credentials.headers(),
        timeout=aiohttp.ClientTimeout(),
    ) as session:
        async with session.get(path, raise_for_status=True) as listed:
            start = (await listed.json())["metadata"]["resourceVersion"]
        params = {"watch": "1", "resourceVersion": start, "fieldSelector": f"metadata.name={LEASE}"}
        async with session.get(path, params=params, raise_for_status=True) as stream:
            following = asyncio.create_task(versions.follow(stream.content))
            try:
                yield versions
            finally:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)


class Relay:
    """A loopback TCP relay to the apiserver (TLS passes through) that the test can cut and restore."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.target = (target.hostname, target.port)
        self.up = True
        self.ends: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        ends = {writer, upstream_writer}
        if not self.up:  # checked after connecting, so that no link outlives a cut made meanwhile
            for end in ends:
                end.close()
            return
        self.ends |= ends
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        finally:
            self.ends -= ends

    def cut(self) -> None:
        """New connections are closed at once and open ones are dropped, requests in flight with them."""
        self.up = False
        for end in self.ends:
            end.close()

    def restore(self) -> None:
        self.up = True


@asynccontextmanager
async def relayed(credentials: Credentials) -> AsyncIterator[tuple[Relay, Credentials]]:
    """A relay to the apiserver, and credentials that reach it through the relay.

    The relay listens on 127.0.0.1, which the apiserver's certificate names, so TLS verifies as before.
    """
    relay = Relay(credentials.host)
    server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield relay, replace(credentials, host=f"https://127.0.0.1:{port}")
    finally:
        server.close()
        relay.cut()
        await server.wait_closed()


class Replica:
    """An elector whose term records when it ended, on the wall clock that renewTimes are stamped with,
    and fails once ``failure`` is set."""

    def __init__(self, kube: Kube, namespace: str, identity: str) -> None:
        self.elector = LeaderElector(kube, namespace, LEASE, identity, **TIMING)
        self.working = False
        self.ended_at: float | None = None
        self.failure = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _term(self) -> None:
        self.working = True
        try:
            await self.failure.wait()
            raise RuntimeError("a bug in the work")
        finally:
            self.working, self.ended_at = False, time.time()

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


async def take(kube: Kube, namespace: str) -> None:
    """Write another holder into the Lease, as a replica that took it over would."""
    await kube.request("PATCH", object_path("Lease", namespace, LEASE), {"spec": {"holderIdentity": "intruder"}},
                       content_type="application/merge-patch+json")


async def leader(kube: Kube, namespace: str) -> Replica:
    """Replica a, alone, once it leads."""
    a = Replica(kube, namespace, "a").start()
    await until("a to lead", lambda: a.working, 2)
    return a


@pytest.mark.cluster
def test_one_replica_works_and_a_clean_stop_hands_over_at_once(credentials: Credentials, namespace: str) -> None:
    async def body() -> None:
        async with connected(credentials) as kube, watched(credentials, namespace) as versions:
            a = await leader(kube, namespace)
            b = Replica(kube, namespace, "b").start()
            await asyncio.sleep(3 * TIMING["retry_period"])
            assert (await lease(kube, namespace))["spec"]["holderIdentity"] == "a" and not b.working
            await a.stop()
            assert a.ended_at is not None
            took = await until("b to take over", lambda: b.working, 2)
            taken = await lease(kube, namespace)
            assert took < TIMING["lease_duration"] and taken["spec"]["holderIdentity"] == "b"
            assert taken["spec"]["leaseTransitions"] == 1
            # a released the Lease as it stopped, b took it from there, and the release came after
            # a's term had ended, so the two never overlap.
            *_, released, acquired = await versions.through(taken)
            assert [released["spec"]["holderIdentity"], acquired["spec"]["holderIdentity"]] == ["", "b"]
            assert renewed(released) >= a.ended_at
            await b.stop()

    asyncio.run(body())


@pytest.mark.cluster
def test_a_holder_that_died_is_replaced_after_the_lease_duration(credentials: Credentials, namespace: str) -> None:
    async def body() -> None:
        async with connected(credentials) as kube:
            # Held by a replica that is gone without releasing, with a renewTime from long ago.
            await kube.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                               "metadata": {"name": LEASE, "namespace": namespace},
                               "spec": {**HELD_BY_B, "leaseDurationSeconds": 1}})
            a = Replica(kube, namespace, "a").start()
            took = await until("a to take over", lambda: a.working, 3)
            assert took >= 1 - TIMING["retry_period"], took
            taken = (await lease(kube, namespace))["spec"]
            assert taken["holderIdentity"] == "a" and taken["leaseTransitions"] == 4
            await a.stop()

    asyncio.run(body())


@pytest.mark.cluster
def test_a_leader_cut_off_from_the_apiserver_stops_before_its_lease_expires(
    credentials: Credentials, namespace: str,
) -> None:
    async def body() -> None:
        async with (connected(credentials) as kube, relayed(credentials) as (relay, through_relay),
                    connected(through_relay) as cut_off):
            a = await leader(cut_off, namespace)
            relay.cut()
            await until("a to stop working", lambda: not a.working, 2)
            # Read once a has stopped: by then its last write, even one in flight at the cut, has landed.
            held = await lease(kube, namespace)
            assert a.ended_at is not None and held["spec"]["holderIdentity"] == "a"
            assert a.ended_at - renewed(held) < TIMING["lease_duration"]
            relay.restore()
            # Nobody took the Lease meanwhile: a still holds it and resumes.
            await until("a to lead again", lambda: a.working, 2)
            assert (await lease(kube, namespace))["spec"]["holderIdentity"] == "a"
            await a.stop()

    asyncio.run(body())


@pytest.mark.cluster
def test_a_leader_whose_lease_was_taken_stops_at_once(credentials: Credentials, namespace: str) -> None:
    async def body() -> None:
        async with connected(credentials) as kube:
            a = await leader(kube, namespace)
            taking = asyncio.create_task(take(kube, namespace))
            # Timed from when the take is sent, since it lands some time before it is answered.
            await until("a to stop working", lambda: not a.working, 3 * TIMING["retry_period"] + 0.5)
            await taking
            assert (await lease(kube, namespace))["spec"]["holderIdentity"] == "intruder"
            await a.stop()
            # Nothing released that was not a's.
            assert (await lease(kube, namespace))["spec"]["holderIdentity"] == "intruder"

    asyncio.run(body())


@pytest.mark.cluster
def test_a_leader_whose_term_fails_releases_the_lease_and_stops_campaigning(
    credentials: Credentials, namespace: str,
) -> None:
    async def body() -> None:
        async with connected(credentials) as kube, watched(credentials, namespace) as versions:
            a = await leader(kube, namespace)
            b = Replica(kube, namespace, "b").start()
            a.failure.set()
            task = a.task
            assert task is not None
            await until("a to stop campaigning", task.done, 2)
            ended = task.exception()
            assert isinstance(ended, TermEnded) and isinstance(ended.__cause__, RuntimeError)
            assert a.elector.fault() is not None
            await until("b to take over", lambda: b.working, 2)
            # a released the Lease rather than leaving it to expire.
            taken = await lease(kube, namespace)
            *_, released, acquired = await versions.through(taken)
            assert [released["spec"]["holderIdentity"], acquired["spec"]["holderIdentity"]] == ["", "b"]
            await b.stop()

    asyncio.run(body())


@pytest.mark.cluster
def test_a_leader_that_cannot_stop_its_term_fails_liveness(credentials: Credentials, namespace: str) -> None:
    async def body() -> None:
        unstuck = asyncio.Event()

        async def stuck_term() -> None:
            """Work whose clean-up does not finish once it is told to stop, as if stuck on a dead connection."""
            try:
                await asyncio.Event().wait()
            finally:
                await unstuck.wait()

        async with relayed(credentials) as (relay, through_relay), connected(through_relay) as cut_off:
            elector = LeaderElector(cut_off, namespace, LEASE, "a", **TIMING)
            running = asyncio.create_task(elector.run(stuck_term))
            try:
                await until("a to lead", lambda: elector.leading, 2)
                await asyncio.sleep(3 * TIMING["retry_period"])
                assert elector.fault() is None
                relay.cut()
                # Past the renew deadline a tries to stop, cannot, and so never stops leading.
                await until("liveness to fail", lambda: elector.fault() is not None, 3)
                assert elector.leading
            finally:
                unstuck.set()
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)

    asyncio.run(body())


# -- the operator's own term (handlers) -------------------------------------------------------------


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def phase_counts() -> dict[str, float]:
    [family] = [metric for metric in REGISTRY.collect() if metric.name == "vllm_operator_llmdeployments"]
    return {sample.labels["phase"]: sample.value for sample in family.samples}


@pytest.fixture
def replica_a(cluster: Cluster, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's start-up and clean-up run replica "a" of the Lease in ``namespace``."""
    monkeypatch.setattr(handlers, "OPTIONS", RunOptions(
        kubeconfig=str(cluster.kubeconfig), metrics_port=0, leader_election_namespace=namespace,
        leader_election_id=LEASE, identity="a"))
    monkeypatch.setattr(handlers, "_state", {})
    monkeypatch.setattr(handlers, "WORK_FAILED", asyncio.Event())
    # Each start-up registers collectors of its own controller, which one registry takes only once.
    monkeypatch.setattr(handlers, "REGISTRY", CollectorRegistry())


@asynccontextmanager
async def operating() -> AsyncIterator[None]:
    """The operator's start-up and clean-up, as kopf runs them (without its watches)."""
    await handlers.start(settings=kopf.OperatorSettings())
    try:
        yield
    finally:
        await handlers.stop()


def is_leading() -> bool:
    return gauge("vllm_operator_leader") == 1


@pytest.mark.cluster
@pytest.mark.usefixtures("replica_a")
def test_an_operator_whose_work_fails_hands_over_fails_liveness_and_stops(
    credentials: Credentials, namespace: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body() -> None:
        failure = asyncio.Event()

        async def failing_workers(controller: Controller, count: int) -> None:
            await failure.wait()
            raise RuntimeError("a bug in the workers")

        monkeypatch.setattr(Controller, "run_workers", failing_workers)
        async with connected(credentials) as kube, watched(credentials, namespace) as versions, operating():
            await until("a to lead", is_leading, 5)
            assert await handlers.liveness() == "leading"
            b = Replica(kube, namespace, "b").start()
            failure.set()
            await until("the operator to stop", handlers.WORK_FAILED.is_set, 5)
            with pytest.raises(kopf.PermanentError):
                await handlers.liveness()
            await until("b to take over", lambda: b.working, 2)
            taken = await lease(kube, namespace)
            *_, released, acquired = await versions.through(taken)
            assert [released["spec"]["holderIdentity"], acquired["spec"]["holderIdentity"]] == ["", "b"]
            await b.stop()

    asyncio.run(body())


@pytest.mark.cluster
@pytest.mark.usefixtures("replica_a")
def test_a_replica_that_stops_leading_exports_no_phases(credentials: Credentials, namespace: str) -> None:
    async def body() -> None:
        async with connected(credentials) as kube, operating():
            await until("a to lead", is_leading, 5)
            # As the term's status writes record them.
            observability.set_phase((namespace, "llama"), "Ready")
            observability.set_phase((namespace, "qwen"), "Failed")
            assert phase_counts()["Ready"] >= 1
            await take(kube, namespace)
            await until("a to stop leading", lambda: not is_leading(), 5)
            assert set(phase_counts().values()) == {0}
            assert gauge("vllm_operator_llmdeployment_phase", namespace=namespace, llmdeployment="llama",
                         phase="Ready") is None

    asyncio.run(body())


# The operator, with its workers replaced by a bug that fails at once.
FAILING_OPERATOR = """
import sys

from vllm_operator.reconcile.controller import Controller


async def failing_workers(controller, count):
    raise RuntimeError("a bug in the workers")


Controller.run_workers = failing_workers
from vllm_operator.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.cluster
@pytest.mark.usefixtures("crd_installed")
def test_an_operator_without_election_whose_work_fails_exits(
    cluster: Cluster, namespace: str, tmp_path: Path,
) -> None:
    # Nothing else notices a single replica that watches but no longer works: it must exit to be restarted.
    log_file = tmp_path / "operator.log"
    command = [sys.executable, "-c", FAILING_OPERATOR, "run", "--kubeconfig", str(cluster.kubeconfig),
               "--metrics-port", "0", "--health-port", "0", "--namespace", namespace]
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**operator_env(), "KUBECONFIG": str(cluster.kubeconfig)})
    try:
        code = process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the operator kept running after its work failed:\n{log_file.read_text()[-3000:]}")
    output = log_file.read_text()
    assert code == 1, output[-3000:]
    assert "a bug in the workers" in output
