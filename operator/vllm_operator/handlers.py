"""kopf wiring: watches feed the controller; start-up and clean-up own its tasks. No logic here.

Every replica watches, so a standby's stores are warm when it takes over; only the leader (or a
replica run without ``--leader-elect``) reconciles and scrapes. Once that work (or the election)
ends on its own, the operator stops and exits non-zero, and its liveness probe fails meanwhile: a
process that watches but no longer works would otherwise look alive while doing nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import kopf
from kopf._core.reactor.inventory import ResourceMemories, ResourceMemory
from prometheus_client import REGISTRY, start_http_server

from vllm_operator import api, kubeconfig, observability
from vllm_operator.engines.export import EngineLoadCollector
from vllm_operator.adapters.sync import AdapterSync
from vllm_operator.engines.monitor import EngineMonitor
from vllm_operator.engines.startup import LOG_LIMIT_BYTES, LOG_TAIL_LINES
from vllm_operator.kube import Credentials, Kube
from vllm_operator.leader import LeaderElector
from vllm_operator.reconcile.controller import Controller
from vllm_operator.render.manifests import ENGINE_CONTAINER, SELECTOR_LABEL
from vllm_operator.render.puller import DEFAULT_IMAGE as DEFAULT_PULLER_IMAGE
from vllm_operator.render.puller import PullerSettings


@dataclass
class RunOptions:
    kubeconfig: str | None = None
    metrics_port: int = 8080
    workers: int = 32
    # Client-side limit of the reconciler's apiserver requests (cli.py says why this high).
    kube_qps: float = 500.0
    kube_burst: int = 1000
    scrape_interval: float = 15.0
    scrape_timeout: float = 5.0
    scrape_concurrency: int = 64
    status_min_interval: float = 30.0
    status_writes_per_second: float = 100.0
    model_puller_image: str = DEFAULT_PULLER_IMAGE
    # The Lease's namespace and name and this replica's identity; no namespace: no election.
    leader_election_namespace: str | None = None
    leader_election_id: str = "vllm-operator"
    identity: str = ""


OPTIONS = RunOptions()
_state: dict[str, Any] = {}
# Set when the operator's own work has ended on its own: cli.py passes it to kopf as the stop flag,
# then exits non-zero.
WORK_FAILED = asyncio.Event()

log = logging.getLogger("vllm_operator.handlers")

_OWNED = {SELECTOR_LABEL: kopf.PRESENT}


class NoDiffBase(kopf.DiffBaseStorage):
    """No last-handled state: with only event handlers, kopf's copy and diff of every body is wasted.

    kopf builds that copy for each watch event whatever the handlers; it was a sixth of the
    operator's CPU while 1,000 LLMDeployments settled.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


class EventMemories(ResourceMemories):
    """kopf's per-object records, kept for no object: a fresh one for each watch event.

    kopf keeps one (memo, error throttler, daemon and index state) per watched object until it is
    deleted; only daemons, indexes and change handlers read them again, and this operator has event
    handlers only. At 845 bytes each (tracemalloc) and six objects per LLMDeployment (it, its
    Deployment, ReplicaSet, Pod, Service and claim) they held 5 KB per LLMDeployment for nothing.
    kopf.run takes the container; the class is kopf's own, not exported.
    """

    async def recall(self, raw_body: kopf.RawBody, *, memobase: Any = None,
                     noticed_by_listing: bool = False, ephemeral: bool = False) -> ResourceMemory:
        return await super().recall(raw_body, memobase=memobase, noticed_by_listing=noticed_by_listing,
                                    ephemeral=True)


def _controller() -> Controller:
    return _state["controller"]


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's watches log in with the reconciler's credentials; run again when they expire or are refused.

    Ours and not kopf's fallbacks: those import the ``kubernetes`` package when it is installed
    (kubeconfig.py says what that costs), and kopf's own kubeconfig reader runs no exec plugins.
    """
    access = kubeconfig.load(OPTIONS.kubeconfig)
    return kopf.ConnectionInfo(
        server=access.server, ca_path=access.ca_file, ca_data=access.ca_data, insecure=access.insecure,
        token=access.token.value() if access.token else None,
        certificate_path=access.cert_file, certificate_data=access.cert_data,
        private_key_path=access.key_file, private_key_data=access.key_data,
        default_namespace=access.namespace, expiration=access.expires,
    )


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
    # The controller records its own Events; kopf's per-handler Events would only repeat them.
    settings.posting.enabled = False
    # Serve only what exists at start-up; watching CRDs and namespaces would need more RBAC.
    settings.scanning.disabled = True
    settings.watching.reconnect_backoff = 1.0
    settings.persistence.diffbase_storage = NoDiffBase()
    # kopf keeps a task per recently changed object; the controller settles bursts itself, so a
    # worker need not wait long for more events, and a thousand Pods starting hold fewer at once.
    settings.queueing.idle_timeout = 1.0
    if OPTIONS.metrics_port:
        start_http_server(OPTIONS.metrics_port)
    credentials = Credentials.load(OPTIONS.kubeconfig)
    kube = Kube(credentials, qps=OPTIONS.kube_qps, burst=OPTIONS.kube_burst)
    # Download Jobs ask the hub the operator asks (HF_ENDPOINT: a mirror, or the tests' local hub).
    puller = PullerSettings(OPTIONS.model_puller_image, os.environ.get("HF_ENDPOINT") or None)
    controller = Controller(kube, OPTIONS.status_min_interval, OPTIONS.status_writes_per_second, puller=puller,
                            progress_interval=OPTIONS.scrape_interval)
    loads = EngineLoadCollector(lambda: {key: view.stats for key, view in controller.engines.items()},
                                lambda: {key: decision.desired for key, decision in controller.decisions.items()})
    REGISTRY.register(loads)
    clients = [kube]
    if OPTIONS.leader_election_namespace:
        # A connection of its own: a renewal queued behind a burst of reconcile writes could miss
        # the renew deadline and hand the Lease over for nothing.
        lease_kube = Kube(credentials, max_connections=1)
        clients.append(lease_kube)
        elector = LeaderElector(lease_kube, OPTIONS.leader_election_namespace, OPTIONS.leader_election_id,
                                OPTIONS.identity)
        _state["elector"] = elector
        task = asyncio.create_task(elector.run(lambda: _work(controller)), name="leader-election")
    else:
        task = asyncio.create_task(_work(controller), name="work")
    task.add_done_callback(_work_ended)
    _state.update(clients=clients, controller=controller, task=task, collector=loads)


def _work_ended(task: asyncio.Task[None]) -> None:
    if task.cancelled():  # by clean-up
        return
    # Exit, as controller-runtime's manager does when a runnable fails: a restarted process starts
    # afresh from the watches (and with leader election, a standby has taken the released Lease).
    log.error("the operator's work has ended; stopping", exc_info=task.exception())
    WORK_FAILED.set()


async def _work(controller: Controller) -> None:
    """Reconcile and scrape until cancelled: for the whole run, or for one term as leader."""
    # A monitor per term: rates from the previous term's samples would span the time in between.
    kube = controller.kube
    monitor = EngineMonitor(controller, OPTIONS.scrape_interval, OPTIONS.scrape_timeout, OPTIONS.scrape_concurrency,
                            logs=lambda namespace, pod: kube.pod_log(namespace, pod, ENGINE_CONTAINER,
                                                                     LOG_TAIL_LINES, LOG_LIMIT_BYTES))
    adapters = AdapterSync(controller, kube, OPTIONS.scrape_interval)
    controller.resync()
    observability.LEADER.set(1)
    try:
        # A task group: when one of them fails, the other is stopped too, not left running unled.
        async with asyncio.TaskGroup() as group:
            group.create_task(controller.run_workers(OPTIONS.workers))
            group.create_task(monitor.run())
            group.create_task(adapters.run())
    finally:
        observability.term_ended()
        controller.forget_term()
        await monitor.close()
        await adapters.close()


@kopf.on.probe(id="work")
async def liveness(**_: Any) -> str:
    """Part of /healthz: it fails while this replica cannot do its part, so that it is restarted.

    A PermanentError fails the probe at once; kopf would retry any other error, holding /healthz
    until the kubelet gives up waiting.
    """
    task, elector = _state.get("task"), _state.get("elector")
    if task is None or task.done():
        raise kopf.PermanentError("the operator's work has ended")
    fault = elector.fault() if elector is not None else None
    if fault is not None:
        raise kopf.PermanentError(fault)
    if elector is None:
        return "working"
    return "leading" if elector.leading else "standing by"


@kopf.on.cleanup()
async def stop(**_: Any) -> None:
    if "task" in _state:
        # With leader election this also stops the term before releasing the Lease.
        _state["task"].cancel()
        await asyncio.gather(_state["task"], return_exceptions=True)
    for client in _state.get("clients", []):
        await client.close()
    if "controller" in _state:
        await _state["controller"].progress.close()
    if "collector" in _state:
        REGISTRY.unregister(_state.pop("collector"))


# Handlers are coroutines on purpose: kopf runs plain functions in threads, and the controller's
# asyncio queue must only be touched from the event loop.
@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def llmdeployment_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_resource(event["type"], event["object"])


@kopf.on.event("pods", labels=_OWNED)
async def pod_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("Pod", event["type"], event["object"])


@kopf.on.event("apps", "v1", "deployments", labels=_OWNED)
async def deployment_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("Deployment", event["type"], event["object"])


@kopf.on.event("services", labels=_OWNED)
async def service_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("Service", event["type"], event["object"])


@kopf.on.event("persistentvolumeclaims", labels=_OWNED)
async def claim_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("PersistentVolumeClaim", event["type"], event["object"])


@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=_OWNED)
async def disruption_budget_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("PodDisruptionBudget", event["type"], event["object"])


# Only where the LeaderWorkerSet CRD is installed: kopf starts this watch once the resource appears.
@kopf.on.event("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", labels=_OWNED)
async def leader_worker_set_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("LeaderWorkerSet", event["type"], event["object"])


@kopf.on.event("batch", "v1", "jobs", labels=_OWNED)
async def job_changed(event: kopf.RawEvent, **_: Any) -> None:
    # Serving benchmarks (benchmark/__init__.py): their end brings the result into the status.
    _controller().observe_child("Job", event["type"], event["object"])


@kopf.on.event("apps", "v1", "replicasets", labels=_OWNED)
async def replica_set_changed(event: kopf.RawEvent, **_: Any) -> None:
    # Only to follow owner references from the engine Deployment to its Pods.
    _controller().observe_child("ReplicaSet", event["type"], event["object"])
