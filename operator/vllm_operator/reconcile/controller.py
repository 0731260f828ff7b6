"""The level-based reconciler: an in-memory view of the cluster, a work queue, and one reconcile.

kopf's watches feed ``Controller.observe``; every change enqueues the owning LLMDeployment, and a
worker compares what should exist with what does, writing only the difference. An idle
LLMDeployment therefore costs no API writes at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from vllm_operator import api, benchmark, observability
from vllm_operator.adapters.sync import AdapterTarget, ReplicaAdapters
from vllm_operator.api import (
    LLMDeploymentSpec,
    adapter_name_clash,
    adapter_source,
    lora_enabled,
    name_too_long_across_nodes,
    pulls_model,
)
from vllm_operator.autoscale.decide import Autoscaler, Decision, LoadSample
from vllm_operator.cache.fit import (
    Deployment,
    DoesNotFit,
    Fits,
    Unknown,
    Verdict,
    capacity_status,
    check_fit,
    fit_checked_repo,
)
from vllm_operator.cache.download import Download, download, finished, job_owner, made_by_operator, progress_url
from vllm_operator.cache.hub import HubMetadata, Unjudged
from vllm_operator.cache.progress import ProgressReader
from vllm_operator.engines.metrics import EngineStats
from vllm_operator.engines.startup import StartupStage
from vllm_operator.kube import Kube, KubeError, now_rfc3339
from vllm_operator.reconcile.drift import controller_uid, matches, owned, stamped
from vllm_operator.reconcile.queue import Key, WorkQueue, retry_delay
from vllm_operator.reconcile.stores import PackedChild, slim, slim_pod
from vllm_operator.reconcile.status import Observation, compute_status, past_startup, status_events
from vllm_operator.reconcile.writes import Change, WriteBudget, classify, figures_moved
from vllm_operator.render.engine_args import ENGINE_PORT, served_model_name
from vllm_operator.render.manifests import (
    SELECTOR_LABEL,
    ChildKey,
    Manifest,
    Owner,
    children,
    common_labels,
    endpoint,
    engine_keys,
    live_startup_budget,
    serving_selector,
    startup_budget_seconds,
)
from vllm_operator.render import multinode
from vllm_operator.render.adapters import READINESS_GATE, wanted_adapters
from vllm_operator.render.puller import COMPONENT as PULLER_COMPONENT
from vllm_operator.render.puller import Pull, PullerSettings, adapter_pull, job_name, model_pull, pull_job

log = logging.getLogger("vllm_operator.reconcile.controller")

# How long a change of a child or of a status waits for the changes that usually follow it.
SETTLE_SECONDS = 1.0
LWS_MISSING = (
    "the LeaderWorkerSet API is not installed: accelerator.nodesPerReplica > 1 needs the LeaderWorkerSet controller "
    "(sigs.k8s.io/lws v0.7 or later) in the cluster; install it, or set nodesPerReplica: 1"
)


def describe_validation_error(error: ValidationError) -> str:
    """pydantic's errors as one line a person can act on: 'spec.engine.maxNumSeqs: ...'."""
    parts = []
    for item in error.errors():
        location = ".".join(str(p) for p in ("spec", *item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}")
    return "; ".join(parts)


def conflict_message(kind: str, name: str, obj: Mapping[str, Any], owner: Owner) -> str:
    """Why the operator leaves an object of its child's name alone, and what the user can do."""
    ref = next((r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")), None)
    if ref is not None and ref.get("kind") == api.KIND and ref.get("name") == owner.name:
        return (f"{kind} {name} still belongs to an earlier LLMDeployment named {owner.name} (uid {ref.get('uid')}); "
                f"it is replaced once the garbage collector has removed it")
    holder = f"is controlled by {ref.get('kind')} {ref.get('name')}" if ref else "was not created by this LLMDeployment"
    advice = (f"delete or rename it, or set spec.cache.existingClaim: {name} to use it as the cache"
              if kind == "PersistentVolumeClaim" else "delete or rename it, or give the LLMDeployment another name")
    return f"{kind} {name} already exists and {holder}; the operator leaves it untouched: {advice}"


@dataclass(frozen=True)
class ChildOutcome:
    child: str  # "Deployment llama-3-8b"
    change: str | None = None  # "created" or "updated"
    error: str | None = None
    conflict: str | None = None  # an object of the child's name that is not ours


@dataclass(frozen=True)
class Scaled:
    """The autoscaler's last write of spec.replicas."""

    at: str  # RFC 3339
    decision: Decision


@dataclass
class EngineView:
    stats: EngineStats | None = None
    unhealthy: dict[str, str] = field(default_factory=dict)
    # Pod name -> (stage, since) of each replica still starting, from its log.
    startup: dict[str, tuple[StartupStage, str]] = field(default_factory=dict)
    # Adapter name -> what the engines load it from, for the adapters ready to load; set by each reconcile.
    wanted: dict[str, str] = field(default_factory=dict)
    # Pod name -> what its engine has of them (adapters/sync.py).
    adapters: dict[str, ReplicaAdapters] = field(default_factory=dict)


# Engine load figures reach the status at most this often per LLMDeployment, and the fleet's
# figure-only writes share this many a second (reconcile/writes.py says why).
STATUS_MIN_INTERVAL_SECONDS = 30.0
STATUS_WRITES_PER_SECOND = 100.0
# How often a download's progress is read (the scrape interval of the engines).
PROGRESS_INTERVAL_SECONDS = 15.0


class Controller:
    def __init__(self, kube: Kube, status_min_interval: float = STATUS_MIN_INTERVAL_SECONDS,
                 status_writes_per_second: float = STATUS_WRITES_PER_SECOND, hub: HubMetadata | None = None,
                 puller: PullerSettings | None = None, progress_interval: float = PROGRESS_INTERVAL_SECONDS) -> None:
        self.kube = kube
        self.hub = hub if hub is not None else HubMetadata()
        self.puller = puller if puller is not None else PullerSettings()
        self.progress = ProgressReader()
        self.progress_interval = progress_interval
        self.queue = WorkQueue()
        self.status_min_interval = status_min_interval
        self.budget = WriteBudget(status_writes_per_second)
        self.resources: dict[Key, dict[str, Any]] = {}
        # Watched objects carrying an LLMDeployment's label, by LLMDeployment. The label only finds
        # them: what is the operator's is decided by controller owner references (drift.owned).
        self.children: dict[Key, dict[ChildKey, PackedChild]] = {}
        self.replica_sets: dict[Key, dict[str, str | None]] = {}  # ReplicaSet uid -> its controller's uid
        self.pods: dict[Key, dict[str, dict[str, Any]]] = {}
        self.engines: dict[Key, EngineView] = {}
        # Errors and conflicts of the last sync per resource, shown in its status until they clear.
        self.apply_errors: dict[Key, list[str]] = {}
        self.conflicts: dict[Key, list[str]] = {}
        self._failures: dict[Key, int] = {}  # failed reconciles in a row, for the retry backoff
        self._statuses: dict[Key, dict[str, Any]] = {}  # as last written
        self._written_at: dict[Key, float] = {}  # monotonic time of that write
        self._specs: dict[Key, tuple[int, LLMDeploymentSpec]] = {}  # parsed spec, by generation
        self.autoscalers: dict[Key, Autoscaler] = {}
        self.decisions: dict[Key, Decision] = {}  # the autoscaler's latest
        self._scaled: dict[Key, Scaled] = {}
        self.autoscaler_conflicts: dict[Key, str] = {}
        self._replicas_known: dict[Key, int] = {}  # spec.replicas as the autoscaler last saw or set it
        self._posting: set[asyncio.Task[None]] = set()
        self._stores = (self.resources, self.children, self.replica_sets, self.pods, self.engines,
                        self.apply_errors, self.conflicts, self._failures, self._statuses, self._written_at,
                        self._specs, self.autoscalers, self.decisions, self._scaled, self.autoscaler_conflicts,
                        self._replicas_known)

    # -- watch events -------------------------------------------------------------------------

    def observe_resource(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            for store in self._stores:
                store.pop(key, None)
            self.budget.cancel(key)
            observability.set_phase(key, None)
            return
        previous = self.resources.get(key)
        self.resources[key] = slim(body)
        if key in self._statuses and self._statuses[key] == body.get("status"):
            # The watch has caught up with the status last written: the body holds it, and a second
            # copy of every status was 5 KB per LLMDeployment.
            del self._statuses[key]
        if previous is None or previous["metadata"].get("generation") != meta.get("generation"):
            self.queue.add(key)  # a new or edited spec: the user waits for this one
        else:
            self.queue.add_after(key, SETTLE_SECONDS)  # status or metadata only, most often our own write

    def observe_child(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        owner = (meta.get("labels") or {}).get(SELECTOR_LABEL)
        if owner is None:
            return
        key = (meta["namespace"], owner)
        store: dict[Key, dict[Any, Any]]
        value: Any
        if kind == "Pod":
            # Status and metadata are all a Pod's reconcile and scrape read.
            store, slot, value = self.pods, meta["name"], slim_pod(body)
        elif kind == "ReplicaSet":
            # Only the owner chain Deployment -> ReplicaSet -> Pod is read of a ReplicaSet.
            store, slot, value = self.replica_sets, meta["uid"], controller_uid(body)
        else:
            store, slot, value = self.children, (kind, meta["name"]), PackedChild(body)
        if event_type == "DELETED":
            store.get(key, {}).pop(slot, None)
        else:
            store.setdefault(key, {})[slot] = value
        if key in self.resources:
            # A Pod going Running fires several events in a row; one reconcile sees them all.
            self.queue.add_after(key, SETTLE_SECONDS)

    # -- leadership ---------------------------------------------------------------------------

    def resync(self) -> None:
        """Queue every known LLMDeployment, so that a new leader reconciles each once."""
        for key in self.resources:
            self.queue.add(key)

    def forget_term(self) -> None:
        """Drop what only the ending term saw; a later term starts from the watched bodies instead."""
        self._statuses.clear()
        self._written_at.clear()
        self.engines.clear()
        self.apply_errors.clear()
        self.conflicts.clear()
        self._failures.clear()
        # An ended term writes nothing more, Events included: a standby may be leading already.
        for task in self._posting:
            task.cancel()

    # -- reconcile ----------------------------------------------------------------------------

    async def run_workers(self, count: int) -> None:
        await asyncio.gather(*(self._worker() for _ in range(count)))

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            started, result = time.monotonic(), "success"
            try:
                if not await self.reconcile(key):
                    result = "error"  # a child was refused or is not ours: said in the status, tried again
            except KubeError as exc:  # the apiserver's own words say enough; retry later
                result = "error"
                log.warning(f"reconcile failed: {exc}", extra={"namespace": key[0], "llmdeployment": key[1]})
            except Exception:  # a bug must not stop the other LLMDeployments
                result = "error"
                log.exception("reconcile failed", extra={"namespace": key[0], "llmdeployment": key[1]})
            finally:
                self.queue.done(key)
                observability.record_reconcile(result, time.monotonic() - started)
            if result == "error" and key in self.resources:
                # Retried by itself: what refused it (a quota, a conflict, the apiserver) need not send an event.
                self._failures[key] = self._failures.get(key, 0) + 1
                self.queue.add_after(key, retry_delay(self._failures[key]))
            else:
                self._failures.pop(key, None)

    async def reconcile(self, key: Key) -> bool:
        """Make one LLMDeployment's children and status match its spec; False when it must be retried."""
        body = self.resources.get(key)
        if body is None:
            return True
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            # Being deleted (foreground, or held by someone's finalizer): the garbage collector is
            # removing the children, and re-creating any would fight it.
            return True
        owner = Owner(meta["name"], meta["namespace"], meta["uid"])
        try:
            spec = self._spec(key, body)
        except ValidationError as error:
            await self._write_status(key, body, Observation(
                meta["name"], meta["namespace"], meta.get("generation", 0), 0, spec_error=describe_validation_error(error),
            ))
            return True
        if clash := adapter_name_clash(spec, owner.name) or name_too_long_across_nodes(spec, owner.name):
            await self._write_status(key, body, Observation(
                owner.name, owner.namespace, meta.get("generation", 0), 0, spec_error=clash))
            return True
        if spec.autoscaling is not None:
            # The count this operator saw first is the autoscaler's: a later change by anyone else is overruled,
            # even one made before the first scrape.
            self._replicas_known.setdefault(key, spec.replicas)
        verdict = await self._fit(body, spec)
        if isinstance(verdict, DoesNotFit):
            # Before any child: a Pod would only download the weights to fail on them.
            await self._write_status(key, body, Observation(
                owner.name, owner.namespace, meta.get("generation", 0), spec.replicas, does_not_fit=verdict.message))
            return True
        if await self._apply_decision(key, body, spec):
            return True  # the new generation brings the next reconcile
        pulled = await self._download(key, body, spec, owner) if pulls_model(spec) else None
        # Until the model is in the cache, the engine Deployment is neither created nor changed: engines that
        # serve an earlier model keep serving it meanwhile.
        budget = startup_budget_seconds(spec, verdict.capacity.weight_bytes_per_device) if isinstance(verdict, Fits) \
            else live_startup_budget(self._workload_body(key)) or startup_budget_seconds(spec, None)
        synced = await self._sync_children(key, body, spec, owner, budget,
                                           hold_engines=pulled is not None and not pulled.ready)
        adapters = await self._adapter_downloads(key, body, spec, owner)
        downloads = ([pulled] if pulled is not None else []) + list(adapters.values())
        if any(not d.ready and d.failure is None and d.conflict is None for d in downloads):
            self.queue.add_after(key, self.progress_interval)  # the progress of a download sends no watch event
        if pulled is None or pulled.ready:
            await self._drop_finished_downloads(key, owner, keep={d.status["job"] for d in downloads})
        view = self.engines.get(key, EngineView())
        if lora_enabled(spec):  # only then kept: a view per LLMDeployment would cost memory at fleet size
            view = self.engines.setdefault(key, view)
            view.wanted = wanted_adapters(spec, {name: d.status.get("revision") for name, d in adapters.items()
                                                 if d.ready})
        observation = Observation(
            name=owner.name,
            namespace=owner.namespace,
            generation=meta.get("generation", 0),
            desired_replicas=spec.replicas,
            endpoint=endpoint(spec, owner),
            served_model=served_model_name(spec, owner.name),
            selector=",".join(f"{k}={v}" for k, v in serving_selector(spec, owner.name).items()),
            workload=self._workload_body(key),
            pods=list(self.engine_pods(key).values()),
            workers=list(self.worker_pods(key).values()),
            group_size=spec.accelerator.nodes,
            engine=view.stats,
            unhealthy=view.unhealthy,
            apply_errors=tuple(self.apply_errors.get(key, ())),
            conflicts=tuple(self.conflicts.get(key, ())) + tuple(d.conflict for d in downloads if d.conflict),
            autoscaler_conflict=self.autoscaler_conflicts.get(key),
            autoscaling=self._autoscaling_status(key, spec),
            startup=_startup_status(view),
            adapters=_adapter_status(spec, view, adapters),
            capacity=capacity_status(verdict),
            cache=pulled.status if pulled is not None else None,
            download_failed=pulled.failure if pulled is not None else None,
        )
        observation, bench = await self._benchmark(key, body, spec, owner, observation)
        await self._write_status(key, body, observation)
        await self._after_benchmark(key, body, owner, bench)
        return synced and not any(d.conflict for d in downloads)

    async def _benchmark(self, key: Key, body: Mapping[str, Any], spec: LLMDeploymentSpec, owner: Owner,
                         observation: Observation) -> tuple[Observation, benchmark.Plan | None]:
        """Start, follow and record the serving benchmark the annotation asks for (benchmark/ decides)."""
        written = self._written(key, body)
        parsed = benchmark.parse_request(body["metadata"].get("annotations"))
        jobs = [job for (kind, _), child in self.children.get(key, {}).items() if kind == "Job" for job in [child.body()]
                if (job["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == benchmark.COMPONENT]
        previous = written.get("benchmark")
        if parsed is None and not jobs and (previous or {}).get("phase") != "Running":
            return replace(observation, benchmark=previous), None
        running_job = (previous or {}).get("job") if (previous or {}).get("phase") == "Running" else None
        if running_job and not any(job["metadata"]["name"] == running_job for job in jobs):
            # Not seen by this term's watch yet, or deleted: the apiserver knows which.
            found = await self._read("Job", owner.namespace, running_job)
            jobs += [slim(found)] if found is not None else []
        phase = compute_status(observation, written, now_rfc3339()).get("phase")
        pods = [pod for pod in self.pods.get(key, {}).values()
                if (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == benchmark.COMPONENT]
        plan = benchmark.plan(parsed, None if phase == "Ready" else phase or "Pending", spec, owner, jobs, pods,
                              previous, now_rfc3339())
        if plan.report is not None:
            await self.kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
                "name": benchmark.report_name(owner.name), "namespace": owner.namespace,
                "labels": common_labels(owner.name, benchmark.COMPONENT), "ownerReferences": [owner.reference]},
                "data": plan.report})
            observability.record_write("apply", "ConfigMap")
        if plan.create is not None:
            try:
                created = await self.kube.create(plan.create)
                observability.record_write("create", "Job")
            except KubeError as exc:
                if exc.status != 409:  # 409: created by an earlier reconcile whose status write failed
                    raise
                created = await self.kube.get("Job", owner.namespace, plan.create["metadata"]["name"])
            self.children.setdefault(key, {})[("Job", created["metadata"]["name"])] = PackedChild(created)
        return replace(observation, benchmark=plan.status), plan

    async def _after_benchmark(self, key: Key, body: Mapping[str, Any], owner: Owner, plan: benchmark.Plan | None) -> None:
        """Once the status holds a run's result, its Job goes; Events say what changed."""
        if plan is None or not self._current(key, owner):
            return
        for name in plan.delete:
            await self.kube.delete("Job", owner.namespace, name)
            observability.record_write("delete", "Job")
            self.children.get(key, {}).pop(("Job", name), None)
        for type_, reason, message in plan.events:
            self._event(body, type_, reason, message)

    async def _fit(self, body: Mapping[str, Any], spec: LLMDeploymentSpec) -> Verdict | None:
        """The fit check of a Hugging Face model, from what the hub says of it; None when not checked."""
        repo = fit_checked_repo(spec, body["metadata"].get("annotations") or {})
        if repo is None:
            return None
        answer = await self.hub.checkpoint(repo, spec.model.revision)
        return Unknown(answer.message) if isinstance(answer, Unjudged) else check_fit(answer, Deployment.from_spec(spec))

    def _spec(self, key: Key, body: Mapping[str, Any]) -> LLMDeploymentSpec:
        """The parsed spec. Kept per generation only when autoscaling or LoRA is on (every sweep then asks for
        it): a parsed spec is kilobytes, and a thousand of them would be most of the operator's memory."""
        generation = body["metadata"].get("generation", 0)
        cached = self._specs.get(key)
        if cached is not None and cached[0] == generation:
            return cached[1]
        spec = LLMDeploymentSpec.model_validate(body.get("spec") or {})
        if spec.autoscaling is not None or lora_enabled(spec):
            self._specs[key] = (generation, spec)
        else:
            self._specs.pop(key, None)
        return spec

    async def _apply_decision(self, key: Key, body: Mapping[str, Any], spec: LLMDeploymentSpec) -> bool:
        """Write the autoscaler's replicas through the scale subresource; True when it wrote."""
        decision = self._decision_now(key, spec)
        if decision is None:
            return False
        if decision.desired == spec.replicas:
            if decision.measured:
                # The autoscaler agrees with the count, whoever set it: a wake-up from zero is not overruled later.
                # Before any load was measured it has no opinion, and a kubectl scale then is still overruled.
                self._replicas_known[key] = spec.replicas
            return False
        self.autoscaler_conflicts.pop(key, None)
        if conflict := await self._other_autoscaler(key):
            self.autoscaler_conflicts[key] = conflict  # stands aside: two autoscalers would fight over replicas
            return False
        known = self._replicas_known.get(key, spec.replicas)
        await self.kube.scale(key[0], key[1], decision.desired)
        observability.record_write("patch", "LLMDeployment/scale")
        self._scaled[key] = Scaled(now_rfc3339(), decision)
        self._replicas_known[key] = decision.desired
        if known != spec.replicas:
            # kubectl scale, an HPA or a GitOps sync set it: the autoscaler owns the field while it is on.
            self._event(body, "Warning", "ScaleOverruled",
                        f"spec.replicas {spec.replicas} was set outside spec.autoscaling and is set back to "
                        f"{decision.desired}: {decision.reason}; change spec.autoscaling (minReplicas, maxReplicas) "
                        "or remove it to scale by hand")
        else:
            self._event(body, "Normal", "Scaled", f"{spec.replicas} -> {decision.desired} replicas: {decision.reason}")
        return True

    def _decision_now(self, key: Key, spec: LLMDeploymentSpec) -> Decision | None:
        """The last scrape's decision, or, when spec.replicas changed since (kubectl scale, a wake-up from zero)
        or nothing was scraped yet, one decided for the count as it is now: a decision to keep the old count must
        not undo the change, and a count outside the bounds moves to them before any engine reports."""
        if spec.autoscaling is None:
            self._drop_autoscaler(key)
            return None
        decision = self.decisions.get(key)
        if decision is not None and decision.current == spec.replicas:
            return decision
        scaler = self._scaler(key, spec.autoscaling)
        if decision is not None and decision.current == 0:
            scaler.wake()
        decision = self.decisions[key] = scaler.decide(spec.replicas, self._existing(key), time.monotonic())
        return decision

    def _drop_autoscaler(self, key: Key) -> None:
        self.autoscalers.pop(key, None)
        self.decisions.pop(key, None)
        self._replicas_known.pop(key, None)

    def _scaler(self, key: Key, autoscaling: api.AutoscalingSpec) -> Autoscaler:
        """The LLMDeployment's autoscaler, following its spec."""
        scaler = self.autoscalers.get(key)
        if scaler is None:
            scaler = self.autoscalers[key] = Autoscaler(autoscaling)
        else:
            scaler.update_spec(autoscaling)
        return scaler

    async def _other_autoscaler(self, key: Key) -> str | None:
        """An HPA (KEDA makes one too) that scales this LLMDeployment as well, worded for the status."""
        listed = await self.kube.request("GET", f"/apis/autoscaling/v2/namespaces/{key[0]}/horizontalpodautoscalers")
        for hpa in listed.get("items") or []:
            target = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
            if (target.get("kind"), target.get("name")) == (api.KIND, key[1]) \
                    and str(target.get("apiVersion", "")).startswith(f"{api.GROUP}/"):
                return (f"HorizontalPodAutoscaler {hpa['metadata']['name']} also scales this LLMDeployment; the "
                        "built-in autoscaler stands aside: remove spec.autoscaling or that autoscaler")
        return None

    def _autoscaling_status(self, key: Key, spec: LLMDeploymentSpec) -> dict[str, Any] | None:
        decision = self.decisions.get(key)
        if spec.autoscaling is None or decision is None:
            return None
        last = self._scaled.get(key)
        shown = last.decision if last is not None else decision
        # Metric values change with every scrape; the ones of the last scaling decision are the news.
        status: dict[str, Any] = {"desiredReplicas": decision.desired, "reason": shown.reason,
                                  "metrics": dict(shown.metrics)}
        if last is not None:
            status["lastScaleTime"] = last.at
        # No empty metrics map: server-side apply takes {} for null there, which the schema refuses.
        return api.AutoscalingStatus.model_validate(status).model_dump(by_alias=True, exclude_defaults=True)

    def _autoscale(self, key: Key, stats: EngineStats | None) -> None:
        """Feed one scrape to the LLMDeployment's autoscaler; a new decision brings a reconcile."""
        body = self.resources.get(key)
        if body is None or not (body.get("spec") or {}).get("autoscaling"):
            spec = None  # known without parsing the spec, on every scrape of every LLMDeployment
        else:
            try:
                spec = self._spec(key, body)
            except ValidationError:
                spec = None
        if spec is None or spec.autoscaling is None:
            self._drop_autoscaler(key)
            return
        scaler = self._scaler(key, spec.autoscaling)
        now = time.monotonic()
        # No engine answered: that is a sample too, or the load seen before a scale to zero would
        # stand for the present and undo a wake-up.
        scaler.observe(LoadSample(now, 0, 0, 0.0, 0.0, 0) if stats is None else LoadSample(
            now, stats.requests_running, stats.requests_waiting, stats.kv_cache_usage_percent,
            stats.generation_tokens_per_second, stats.scraped_replicas))
        decision = scaler.decide(spec.replicas, self._existing(key), now)
        previous = self.decisions.get(key)
        self.decisions[key] = decision
        if decision.desired != spec.replicas or previous is None or previous.desired != decision.desired:
            self.queue.add(key)

    def _existing(self, key: Key) -> int:
        """Engine replicas that exist, ready or still loading, and are not going away."""
        return sum(1 for pod in self.engine_pods(key).values() if not pod["metadata"].get("deletionTimestamp"))

    def _workload(self, key: Key) -> PackedChild | None:
        """The engine Deployment or LeaderWorkerSet, when it is this LLMDeployment's."""
        body = self.resources.get(key)
        if body is None:
            return None
        for child in engine_keys(key[1]):
            found = self.children.get(key, {}).get(child)
            if found is not None and found.controller == body["metadata"]["uid"]:
                return found
        return None

    def _workload_body(self, key: Key) -> dict[str, Any] | None:
        """The engine Deployment or LeaderWorkerSet, decoded once for a reader of all of it."""
        workload = self._workload(key)
        return workload.body() if workload is not None else None

    def engine_pods(self, key: Key) -> dict[str, dict[str, Any]]:
        """The replicas' serving Pods: of the ReplicaSets of the engine Deployment (a Pod with the label alone is
        not a replica), or the group leaders of the engine LeaderWorkerSet."""
        return self._group_pods(key, leaders=True)

    def worker_pods(self, key: Key) -> dict[str, dict[str, Any]]:
        """The Pods of the engine LeaderWorkerSet's groups other than their leaders."""
        return self._group_pods(key, leaders=False)

    def _group_pods(self, key: Key, leaders: bool) -> dict[str, dict[str, Any]]:
        workload = self._workload(key)
        pods = self.pods.get(key)
        if workload is None or not pods:
            return {}
        if workload.kind == multinode.KIND:
            # The LWS controller owns the leaders' StatefulSet, and each leader Pod its workers' StatefulSet; the
            # group labels are its Pod webhook's, which only it sets on Pods of its StatefulSets.
            return {name: pod for name, pod in pods.items() if multinode.member_of(pod, workload.name) == leaders}
        if not leaders:
            return {}
        uid = workload.uid
        sets = {rs for rs, controller in self.replica_sets.get(key, {}).items() if controller == uid}
        return {name: pod for name, pod in pods.items() if controller_uid(pod) in sets}

    async def _sync_children(self, key: Key, body: Mapping[str, Any], spec: LLMDeploymentSpec, owner: Owner,
                             startup_budget: int, hold_engines: bool = False) -> bool:
        # One round trip for all children, not one each; but the engine workload waits for a new cache claim.
        # Its Pods mount the claim, and a Pod that comes before it is reported Unschedulable (1 in 1,000 new
        # LLMDeployments was). The Service does not wait: ClusterIPs are allocated one at a time, the slow part
        # of a burst.
        live = self.children.get(key, {})
        engines = engine_keys(owner.name)

        def sync(child: ChildKey, manifest: Manifest | None) -> Awaitable[ChildOutcome]:
            known = live.get(child)
            return self._sync_child(key, owner, child, manifest, known.body() if known is not None else None)

        wanted = {child: manifest for child, manifest in children(spec, owner, startup_budget).items()
                  if not (hold_engines and child in engines)}
        new_claims = [child for child, manifest in wanted.items()
                      if child[0] == "PersistentVolumeClaim" and manifest is not None and child not in live]
        claims = asyncio.ensure_future(asyncio.gather(*(sync(child, wanted[child]) for child in new_claims)))

        async def after_claims(child: ChildKey, manifest: Manifest | None) -> ChildOutcome:
            await claims
            return await sync(child, manifest)

        rest = await asyncio.gather(*(after_claims(child, manifest) if child in engines else sync(child, manifest)
                                      for child, manifest in wanted.items() if child not in new_claims))
        outcomes = [*await claims, *rest]
        for store, found in ((self.apply_errors, [o.error for o in outcomes if o.error]),
                             (self.conflicts, [o.conflict for o in outcomes if o.conflict])):
            if found:
                store[key] = found
            else:
                store.pop(key, None)
        # One Event per reconcile and verb: a new LLMDeployment is one "Created", not one per child.
        for verb in ("created", "updated"):
            changed = [outcome.child for outcome in outcomes if outcome.change == verb]
            if changed:
                self._event(body, "Normal", verb.capitalize(), f"{verb} {', '.join(changed)}")
        return not any(outcome.error or outcome.conflict for outcome in outcomes)

    async def _sync_child(
        self, key: Key, owner: Owner, child_key: ChildKey, manifest: Manifest | None, current: dict[str, Any] | None,
    ) -> ChildOutcome:
        """Make one child match its manifest, when it is ours to write."""
        kind, name = child_key
        child = f"{kind} {name}"
        if manifest is None:
            # A claim is never deleted here: it may hold the user's downloaded weights.
            if current is not None and kind != "PersistentVolumeClaim" and controller_uid(current) == owner.uid:
                await self.kube.delete(kind, owner.namespace, name)
                observability.record_write("delete", kind)
            return ChildOutcome(child)
        desired = stamped(manifest)
        known = current is not None
        if current is None:
            # Not watched: new, or someone else's object without our label. Never write over the latter.
            current = await self._read(kind, owner.namespace, name)
        if current is not None and not owned(current, desired, owner.uid):
            return ChildOutcome(child, conflict=conflict_message(kind, name, current, owner))
        if current is not None and matches(desired, current):
            if not known and self._current(key, owner):
                self.children.setdefault(key, {})[child_key] = PackedChild(current)
            return ChildOutcome(child)
        try:
            applied = await self.kube.apply(desired)
        except KubeError as exc:
            if "NamespaceTerminating" in exc.causes:
                # The namespace controller is deleting the children; bringing them back would only fight it.
                return ChildOutcome(child)
            if kind == multinode.KIND and exc.status == 404:
                return ChildOutcome(child, error=LWS_MISSING)
            return ChildOutcome(child, error=f"applying {child} failed: {exc}")
        observability.record_write("apply", kind)
        if not self._current(key, owner):
            # The LLMDeployment went while the apply was in flight. The garbage collector removes what
            # names the gone owner; a retained claim names none, and one made just now holds nothing.
            if current is None and controller_uid(applied) is None:
                await self.kube.delete(kind, owner.namespace, name)
                observability.record_write("delete", kind)
            return ChildOutcome(child)
        self.children.setdefault(key, {})[child_key] = PackedChild(applied)
        verb = "created" if current is None else "updated"
        log.info(f"{kind} {verb}", extra={"namespace": owner.namespace, "llmdeployment": owner.name})
        return ChildOutcome(child, change=verb)

    async def _download(self, key: Key, body: Mapping[str, Any], spec: LLMDeploymentSpec, owner: Owner) -> Download:
        """The download of the model into the cache claim."""
        written = self._written(key, body).get("cache")
        return await self._follow_download(key, body, spec, owner, model_pull(spec), written)

    async def _adapter_downloads(self, key: Key, body: Mapping[str, Any], spec: LLMDeploymentSpec,
                                 owner: Owner) -> dict[str, Download]:
        """The download of each adapter from the hub into the cache claim, by adapter name."""
        written = {a["name"]: a.get("download") for a in
                   self._written(key, body).get("adapters") or []}
        return {adapter.name: await self._follow_download(key, body, spec, owner, adapter_pull(adapter),
                                                          written.get(adapter.name))
                for adapter in spec.adapters if adapter_source(adapter.source)[0] == "hf"}

    async def _follow_download(self, key: Key, body: Mapping[str, Any], spec: LLMDeploymentSpec, owner: Owner,
                               pull: Pull, written: Mapping[str, Any] | None) -> Download:
        """Run, follow or share the Job that downloads ``pull`` into the cache claim (render/puller.py);
        ``written`` is what the status last said of it."""
        name = job_name(spec, owner.name, pull)
        if written is not None and written.get("job") == name and written.get("phase") == "Ready":
            return Download(dict(written), ready=True)  # nothing to read again: the weights stay in the claim
        known = self.children.get(key, {}).get(("Job", name))
        job = known.body() if known is not None else None
        if job is None:
            # Not ours, or not seen yet: another LLMDeployment on the same claim may have made it.
            job = await self._read("Job", owner.namespace, name)
        if job is None:
            try:
                job = await self.kube.create(pull_job(spec, owner, self.puller, pull))
                observability.record_write("create", "Job")
                self._event(body, "Normal", "Downloading", f"created Job {name} to download {pull.repo} into "
                            "the cache claim")
            except KubeError as exc:
                if exc.status in (400, 422):
                    # The apiserver refuses what the spec renders (a node selector value that is no label value):
                    # only a spec edit helps, so it is a failure in the status, not a retry.
                    message = f"the apiserver refused the download Job {name}: {exc}"
                    return Download(api.CacheStatus(phase="Failed", job=name, message=message).model_dump(
                        by_alias=True, exclude_none=True), failure=("JobRefused", message))
                if exc.status != 409:  # 409: made meanwhile by us or an LLMDeployment on the same claim
                    raise
                job = await self.kube.get("Job", owner.namespace, name)
        if not made_by_operator(job):
            # Someone else's Job of that name: never read as a download, nor written.
            conflict = conflict_message("Job", name, job, owner)
            return Download(api.CacheStatus(phase="Pending", job=name, message=conflict).model_dump(
                by_alias=True, exclude_none=True), conflict=conflict)
        if controller_uid(job) == owner.uid and self._current(key, owner):
            self.children.setdefault(key, {})[("Job", name)] = PackedChild(job)
        pods = list(self.pods.get((owner.namespace, job_owner(job) or owner.name), {}).values())
        url = progress_url(job, pods)
        progress = await self.progress.read(url) if url is not None else None
        return download(job, pods, progress, written, owner.name)

    async def _drop_finished_downloads(self, key: Key, owner: Owner, keep: set[str]) -> None:
        """Once the engines' model is in the cache, this LLMDeployment's Jobs of earlier downloads (of another model,
        revision or patterns) go; their bytes stay in the claim."""
        for (kind, name), child in list(self.children.get(key, {}).items()):
            if kind != "Job" or name in keep:
                continue
            job = child.body()
            if ((job["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == PULLER_COMPONENT
                    and controller_uid(job) == owner.uid and finished(job) is not None):
                await self.kube.delete("Job", owner.namespace, name)
                observability.record_write("delete", "Job")
                self.children[key].pop((kind, name), None)

    async def _read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.kube.get(kind, namespace, name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def _current(self, key: Key, owner: Owner) -> bool:
        """Whether ``owner`` is still the live LLMDeployment of ``key``, and not being deleted."""
        body = self.resources.get(key)
        return body is not None and body["metadata"]["uid"] == owner.uid and not body["metadata"].get("deletionTimestamp")

    def _written(self, key: Key, body: Mapping[str, Any]) -> dict[str, Any]:
        """The status last written for ``body``: our own copy until the watch catches up with it, then the watched
        body's, which may be newer than the one a reconcile began with."""
        live = self.resources.get(key)
        if live is not None and live["metadata"]["uid"] == body["metadata"]["uid"]:
            body = live
        return self._statuses.get(key) or body.get("status") or {}

    async def _write_status(self, key: Key, body: Mapping[str, Any], observation: Observation) -> None:
        previous = self._written(key, body)
        status = compute_status(observation, previous, now_rfc3339())
        change = classify(previous, status)
        if change is not Change.FIGURES:
            self.budget.cancel(key)  # nothing to write, or something that goes at once
            if change is Change.NONE:
                # A new leader finds most statuses settled: they count in its phase gauges all the same.
                observability.set_phase(key, status.get("phase"))
                return
        elif wait := self._figures_wait(key):
            self.queue.add_after(key, wait)  # the newest figures then, not these
            return
        try:
            await self.kube.apply_status(key[0], key[1], status)
        except KubeError as exc:
            if exc.status == 404:  # deleted meanwhile; its DELETED event clears the stores
                return
            raise
        observability.record_write("apply", "LLMDeployment/status")
        live = self.resources.get(key)
        if live is None or live["metadata"]["uid"] != body["metadata"]["uid"]:
            return  # deleted while the write was in flight: nothing of it may stay behind
        self._statuses[key] = status
        self._written_at[key] = time.monotonic()
        observability.set_phase(key, status.get("phase"))
        for type_, reason, message in status_events(previous, status):
            self._event(body, type_, reason, message)

    def _figures_wait(self, key: Key) -> float:
        """Seconds before moved engine figures may be written: the per-LLMDeployment interval, then the budget."""
        since = time.monotonic() - self._written_at.get(key, float("-inf"))
        if since < self.status_min_interval:
            observability.STATUS_WRITES_DEFERRED.labels("interval").inc()
            return self.status_min_interval - since
        wait = self.budget.request(key)
        if wait:
            observability.STATUS_WRITES_DEFERRED.labels("budget").inc()
        observability.STATUS_WRITES_WAITING.set(self.budget.waiting)
        return wait

    def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Record an Event in the background: it is for people, and the reconcile need not wait for it."""
        task = asyncio.create_task(self._post_event(body, type_, reason, message))
        self._posting.add(task)  # a task nobody references may be garbage-collected mid-flight
        task.add_done_callback(self._posting.discard)

    async def _post_event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            await self.kube.post_event(body, type_, reason, message)
        except KubeError as exc:
            # A namespace being deleted refuses new Events; its LLMDeployments go with it (so does client-go's
            # recorder, which drops these quietly).
            level = logging.DEBUG if "NamespaceTerminating" in exc.causes else logging.WARNING
            log.log(level, f"event not recorded: {exc}")

    # -- engine metrics -------------------------------------------------------------------------

    def _started_engines(self, key: Key) -> dict[str, tuple[str, Mapping[str, Any]]]:
        """Pod name -> (base URL, Pod) of each engine past its startup probe, whose API answers."""
        started = {}
        for name, pod in self.engine_pods(key).items():
            ip = (pod.get("status") or {}).get("podIP")
            running = (pod.get("status") or {}).get("phase") == "Running"
            if ip and running and not pod["metadata"].get("deletionTimestamp") and past_startup(pod):
                started[name] = (f"http://{_host(ip)}:{ENGINE_PORT}", pod)
        return started

    def scrape_targets(self) -> dict[Key, dict[str, str]]:
        """Base URLs of every started engine Pod, by LLMDeployment."""
        targets: dict[Key, dict[str, str]] = {}
        for key in self.pods:
            if started := self._started_engines(key):
                targets[key] = {name: url for name, (url, _) in started.items()}
        return targets

    def adapter_targets(self) -> dict[Key, AdapterTarget]:
        """The LLMDeployments with LoRA on, their adapters and their started engines."""
        targets = {}
        for key, (_, spec) in self._specs.items():
            if not lora_enabled(spec) or key not in self.resources or key not in self.engines:
                continue
            started = self._started_engines(key)
            pods = self.engine_pods(key)
            targets[key] = AdapterTarget(
                wanted=dict(self.engines[key].wanted), served_name=served_model_name(spec, key[1]),
                api_key=spec.api_key_secret_ref, pods={name: url for name, (url, _) in started.items()},
                gated=frozenset(name for name, (_, pod) in started.items() if not _gate_current(pod)),
                stale=frozenset(name for name, pod in pods.items() if _gate_open(pod) and not _gate_current(pod)))
        return targets

    def update_adapters(self, key: Key, replicas: dict[str, ReplicaAdapters]) -> None:
        """What each engine has of the adapters; a change reaches the status at the next reconcile."""
        view = self.engines.setdefault(key, EngineView())
        if replicas != view.adapters:
            view.adapters = replicas
            if key in self.resources:
                self.queue.add(key)

    def starting_pods(self) -> dict[Key, list[str]]:
        """Engine Pods whose container runs but has not passed its startup probe yet, by LLMDeployment."""
        starting: dict[Key, list[str]] = {}
        for key in self.pods:
            for name, pod in self.engine_pods(key).items():
                statuses = (pod.get("status") or {}).get("containerStatuses") or []
                if not pod["metadata"].get("deletionTimestamp") and statuses and not past_startup(pod) \
                        and all("running" in (s.get("state") or {}) for s in statuses):
                    starting.setdefault(key, []).append(name)
        return starting

    def update_startup(self, key: Key, stages: dict[str, StartupStage]) -> None:
        """The stages read from the starting replicas' logs; a replica not named has started or gone."""
        view = self.engines.setdefault(key, EngineView())
        now = now_rfc3339()
        startup = {pod: (stage, since if known == stage else now)
                   for pod, stage in stages.items() for known, since in [view.startup.get(pod, (None, ""))]}
        if startup != view.startup:
            view.startup = startup
            if key in self.resources:
                self.queue.add(key)

    def update_engine(self, key: Key, stats: EngineStats | None, unhealthy: dict[str, str]) -> None:
        self._autoscale(key, stats)
        view = self.engines.setdefault(key, EngineView())
        before = view.stats
        view.stats, view.unhealthy, health_changed = stats, unhealthy, view.unhealthy != unhealthy
        body = self.resources.get(key)
        if body is None:
            return
        # Only what would be written is worth a reconcile: health, the scraped replicas, or load
        # that moved out of the dead band around the figures last written.
        written = self._written(key, body).get("engine")
        figures = stats.model_dump(by_alias=True, exclude_none=True) if stats is not None else None
        if (health_changed or (before is None) != (stats is None)
                or (written or {}).get("scrapedReplicas") != (figures or {}).get("scrapedReplicas")
                or figures_moved(written, figures)):
            self.queue.add(key)


def _startup_status(view: EngineView) -> dict[str, Any] | None:
    if not view.startup:
        return None
    replicas = [{"pod": pod, "stage": stage, "since": since} for pod, (stage, since) in sorted(view.startup.items())]
    return api.StartupStatus.model_validate({"replicas": replicas}).model_dump(by_alias=True)


def _adapter_status(spec: LLMDeploymentSpec, view: EngineView,
                    downloads: Mapping[str, Download]) -> list[dict[str, Any]] | None:
    """status.adapters: each adapter of the spec in the started engines (or its download from the hub), with the
    first refusal's or the failed download's words."""
    if not lora_enabled(spec):
        return None
    engines = view.adapters.values()
    # An engine that could not be asked (unreachable, or refusing the API key) holds back every adapter.
    unasked = next((f"engine {pod} could not be asked: {engine.error}" for pod, engine in sorted(view.adapters.items())
                    if engine.error), None)
    adapters = []
    for adapter in spec.adapters:
        loaded = sum(adapter.name in engine.loaded for engine in engines)
        download = downloads.get(adapter.name)
        refusal = next((engine.refused[adapter.name] for engine in engines if adapter.name in engine.refused), None)
        if download is not None and not download.ready:
            state, message = ("Failed" if download.failure else "Downloading"), download.status.get("message")
        else:
            state = "Failed" if refusal else "Loaded" if engines and loaded == len(engines) else "Loading"
            message = refusal or (unasked if state == "Loading" else None)
        adapters.append(api.AdapterStatus.model_validate({
            "name": adapter.name, "state": state, "loadedReplicas": loaded, "replicas": len(engines),
            "message": message, "download": download.status if download is not None else None,
        }).model_dump(by_alias=True, exclude_none=True))
    return adapters


def _gate(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == READINESS_GATE and c.get("status") == "True"), None)


def _gate_open(pod: Mapping[str, Any]) -> bool:
    return _gate(pod) is not None


def _gate_current(pod: Mapping[str, Any]) -> bool:
    """Whether the readiness gate was opened for the engine now running: a container restarted since (it lost
    its adapters) makes it stale."""
    gate = _gate(pod)
    if gate is None:
        return False
    starts = [_time(((s.get("state") or {}).get("running") or {}).get("startedAt"))
              for s in (pod.get("status") or {}).get("containerStatuses") or []]
    return _time(gate.get("lastTransitionTime")) >= max(starts, default=datetime.min.replace(tzinfo=timezone.utc))


def _time(stamp: str | None) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else datetime.min.replace(tzinfo=timezone.utc)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
