"""The fault suite (issue 19, part 1): the operator must converge after faults.

On a local cluster of its own (never the shared one: it restarts kube-apiserver and etcd), with simulated
engines only, it injects
1. SIGKILL of the operator at random moments during a seeded sequence of mixed operations (create, edits of
   each field group, ``kubectl scale`` through the scale subresource, delete, namespace delete), the operator
   restarted after each kill;
2. a restart of kube-apiserver, and one of etcd, in the middle of a burst of LLMDeployments, the operator
   left to reconnect by itself (the same process);
3. leader failover: two replicas electing a leader, whose leader is killed (SIGKILL) or cut off (SIGSTOP),
   every write of either replica checked against the Lease's holder in the apiserver's audit log.

After each trial it waits for convergence: every LLMDeployment's children are what
``vllm_operator.render.manifests.children`` renders from its spec (compared as the operator compares them, and
by a dry-run server-side apply of the rendered manifest as the operator's field manager, which must change
nothing, removals included), every status describes its generation, no child is duplicated or outlives its
owner, and no LLMDeployment and no cache claim kept by ``retainOnDelete`` is lost. It prints a table per fault.

    PYTHONPATH=hack python -m devcluster.chaos --size ci|full [--seed N] [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from devcluster import crds
from devcluster.certs import Authority, Identity
from devcluster.cluster import REPO_ROOT, LocalCluster, Ports
from devcluster.operatorproc import OperatorProcess
from vllm_operator import api
from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.kube import FIELD_MANAGER
from vllm_operator.reconcile.drift import controller_uid, matches, owned, stamped
from vllm_operator.render.manifests import SELECTOR_LABEL, Owner, cache_claim_name, children

# Away from the shared cluster's ports and Pod range (and from the demo's).
PORT_BASE_ENV, POD_CIDR_ENV = "VLLM_OPERATOR_CHAOS_PORT_BASE", "VLLM_OPERATOR_CHAOS_POD_CIDR"
DEFAULT_PORT_BASE, DEFAULT_POD_CIDR = 18400, "127.130.0.0/16"
CRD_FILE = REPO_ROOT / "crds" / "llm.vllm-operator.io_llmdeployments.yaml"
DOCS = REPO_ROOT / "docs" / "reliability.md"
SCRAPE_INTERVAL = 2.0
OPERATOR_ARGS = ["--scrape-interval", str(SCRAPE_INTERVAL), "--scrape-timeout", "1.5",
                 "--status-min-interval", str(SCRAPE_INTERVAL)]
REQUEST_TIMEOUT = (5, 30)
# Engines told to stay off the hub: no fit check and no download Job, so nothing waits for a model hub.
OFFLINE = {"name": "HF_HUB_OFFLINE", "value": "1"}
MODELS = ("Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3")
LEASE_NAMESPACE, LEASE_NAME = "chaos-leader", "vllm-operator"
REPLICA_USERS = ("chaos:replica-a", "chaos:replica-b")
KINDS = {  # labelled objects the inspection lists: kind -> (api, list across namespaces)
    "Deployment": ("apps", "list_deployment_for_all_namespaces"),
    "Service": ("core", "list_service_for_all_namespaces"),
    "PersistentVolumeClaim": ("core", "list_persistent_volume_claim_for_all_namespaces"),
    "PodDisruptionBudget": ("policy", "list_pod_disruption_budget_for_all_namespaces"),
    "Job": ("batch", "list_job_for_all_namespaces"),
}
API_VERSIONS = {"Deployment": "apps/v1", "Service": "v1", "PersistentVolumeClaim": "v1",
                "PodDisruptionBudget": "policy/v1"}

Obj = dict[str, Any]
Key = tuple[str, str]  # namespace, name
Out = Callable[[str], None]


@dataclass(frozen=True)
class Size:
    name: str
    operations: int  # operations of the kill scenario, split into ``rounds`` trials
    rounds: int
    burst: int  # LLMDeployments of each restart trial
    restarts: int  # trials per restarted component
    failovers: int  # trials per way of losing the leader
    timeout: float  # seconds one trial may take to converge


SIZES = {
    "ci": Size("ci", operations=30, rounds=3, burst=30, restarts=1, failovers=1, timeout=120),
    "full": Size("full", operations=200, rounds=10, burst=300, restarts=2, failovers=3, timeout=600),
}


# --- outcomes ------------------------------------------------------------------------------------


@dataclass
class Inspection:
    """What differs from a converged cluster; empty lists when converged."""

    diverged: list[str] = field(default_factory=list)  # not there yet: stale status, child not as rendered
    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return not (self.diverged or self.lost or self.duplicates or self.orphans)

    def summary(self, limit: int = 5) -> str:
        parts = [f"{name}: {'; '.join(items[:limit])}" for name, items in
                 (("diverged", self.diverged), ("lost", self.lost), ("duplicates", self.duplicates),
                  ("orphans", self.orphans)) if items]
        return " | ".join(parts) or "converged"


@dataclass
class Trial:
    inspection: Inspection
    seconds: float | None  # to converge; None when it did not
    notes: dict[str, float] = field(default_factory=dict)


@dataclass
class FaultResult:
    fault: str
    trials: list[Trial] = field(default_factory=list)
    crashes: int = 0  # tracebacks in the operator's log, and operator exits nobody caused
    remarks: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.crashes > 0 or any(not t.inspection.converged or t.seconds is None for t in self.trials)

    def row(self) -> list[str]:
        times = [t.seconds for t in self.trials if t.seconds is not None]

        def total(what: str) -> int:
            return sum(len(getattr(t.inspection, what)) for t in self.trials)

        return [self.fault, str(len(self.trials)), str(len(times)), str(total("lost")), str(total("duplicates")),
                str(total("orphans")), str(self.crashes),
                f"{statistics.median(times):.1f} s" if times else "-", f"{max(times):.1f} s" if times else "-",
                "; ".join(self.remarks)]


HEADER = ["Fault", "Trials", "Converged", "Objects lost", "Duplicates", "Orphans", "Crashes",
          "Converge (median)", "Converge (max)", "Notes"]


def table(results: list[FaultResult]) -> str:
    rows = [HEADER, ["---"] * len(HEADER), *(r.row() for r in results)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f} s, max {max(values):.1f} s" if values else "-"


# --- the cluster of the suite --------------------------------------------------------------------


@dataclass
class Context:
    cluster: LocalCluster
    api: client.ApiClient
    work_dir: Path
    rng: random.Random
    out: Out
    size: Size
    started: list[OperatorProcess] = field(default_factory=list)  # every operator process, stopped at the end

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def operator(self, name: str, extra: list[str] | None = None, kubeconfig: Path | None = None) -> OperatorProcess:
        log_file = self.work_dir / "operator" / f"{name}.log"
        process = OperatorProcess(kubeconfig or self.cluster.kubeconfig, log_file, [*OPERATOR_ARGS, *(extra or [])])
        self.started.append(process)
        return process

    def stop_operators(self) -> None:
        for process in self.started:
            if process.process is not None and process.process.poll() is None:
                os.killpg(process.process.pid, signal.SIGCONT)  # a replica cut off by SIGSTOP would ignore SIGTERM
                process.stop()


@contextlib.contextmanager
def own_cluster(out: Out, keep: bool = False) -> Iterator[tuple[LocalCluster, Path]]:
    """A fresh local cluster in a folder of its own, on ports and a Pod range of its own; stopped at the end and
    its folder removed (kept, with the logs, when ``keep``)."""
    work_dir = Path(tempfile.mkdtemp(prefix="vllm-operator-chaos-"))
    cluster = LocalCluster(state_dir=work_dir / "cluster",
                           ports=Ports(int(os.environ.get(PORT_BASE_ENV, DEFAULT_PORT_BASE))),
                           pod_cidr=os.environ.get(POD_CIDR_ENV, DEFAULT_POD_CIDR))
    try:
        cluster.up(lambda line: out(f"[chaos cluster] {line}"))
        yield cluster, work_dir
    finally:
        cluster.down(lambda _line: None)
        if keep:
            out(f"logs kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


def install_crd(api_client: client.ApiClient) -> None:
    manifest = yaml.safe_load(CRD_FILE.read_text())
    crds.apply(api_client, manifest, "chaos")
    until("the CRD to be Established", lambda: crds.established(api_client, manifest["metadata"]["name"]), 30)


def until(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ApiException, OSError, HTTPError):  # the apiserver may be restarting
            if value := probe():
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def restart(cluster: LocalCluster, name: str, extra_args: tuple[str, ...] = (),
            grace: float | None = None) -> tuple[float, float]:
    """Stop one control-plane process (SIGTERM, then SIGKILL after ``grace`` seconds, by default the cluster's) and
    start it again with the same command line; returns the monotonic times it went down and was serving again (the
    apiserver Ready)."""
    process = cluster._process(name)
    if grace is not None:
        process = dataclasses.replace(process, stop_grace=grace)
    pid = process.pid()
    if pid is None:
        raise RuntimeError(f"{name} is not running")
    command = [part.decode() for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    command = [part for part in command if not part.startswith("--audit-")] + list(extra_args)
    down = time.monotonic()
    process.stop()
    process.start(command)
    # The apiserver's readiness includes its etcd connection.
    until(f"{name} to serve again", cluster.apiserver_ready, 90)
    return down, time.monotonic()


def create_namespace(ctx: Context, name: str) -> None:
    ctx.core.create_namespace({"metadata": {"name": name}}, _request_timeout=REQUEST_TIMEOUT)


def delete_namespace(ctx: Context, name: str, wait: float = 0.0) -> None:
    with contextlib.suppress(ApiException):
        ctx.core.delete_namespace(name, _request_timeout=REQUEST_TIMEOUT)
    if wait:
        def gone() -> bool:
            try:
                ctx.core.read_namespace(name, _request_timeout=REQUEST_TIMEOUT)
            except ApiException as exc:
                return exc.status == 404
            return False

        until(f"namespace {name} to go", gone, wait, 1.0)


# --- inspection ----------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the driver did, to tell lost objects and orphans from what was meant."""

    alive: dict[Key, str] = field(default_factory=dict)  # LLMDeployments created and not deleted -> uid
    retained: dict[Key, str] = field(default_factory=dict)  # claims kept by retainOnDelete -> claim uid
    left: set[str] = field(default_factory=set)  # claims whose owner went before retainOnDelete=false was applied
    collected: int = 0  # claims collected because their owner went before retainOnDelete=true was applied
    namespaces: set[str] = field(default_factory=set)  # the suite's, so other objects are none of its business


def _list_labelled(ctx: Context) -> dict[tuple[str, str, str], Obj]:
    apis = {"apps": client.AppsV1Api(ctx.api), "core": client.CoreV1Api(ctx.api),
            "policy": client.PolicyV1Api(ctx.api), "batch": client.BatchV1Api(ctx.api)}
    found = {}
    for kind, (group, method) in KINDS.items():
        listed = getattr(apis[group], method)(label_selector=SELECTOR_LABEL, _request_timeout=REQUEST_TIMEOUT)
        for item in listed.items:
            # List items carry no apiVersion and kind; the manifests compared with them do.
            obj = {**ctx.api.sanitize_for_serialization(item), "apiVersion": API_VERSIONS.get(kind, "batch/v1"),
                   "kind": kind}
            found[(kind, obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
    return found


def inspect(ctx: Context, ledger: Ledger) -> Inspection:
    """The cluster against the ledger and the render functions (cheap: lists only)."""
    result = Inspection()
    listed = ctx.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL, _request_timeout=REQUEST_TIMEOUT)
    llmds = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in listed["items"]
             if o["metadata"]["namespace"] in ledger.namespaces}
    uids = {o["metadata"]["uid"]: key for key, o in llmds.items()}
    objects = {k: o for k, o in _list_labelled(ctx).items() if k[1] in ledger.namespaces}
    for key, uid in ledger.alive.items():
        if llmds.get(key, {}).get("metadata", {}).get("uid") != uid:
            result.lost.append(f"LLMDeployment {'/'.join(key)}")
    for (namespace, name), claim_uid in ledger.retained.items():
        claim = objects.get(("PersistentVolumeClaim", namespace, cache_claim_name(name)))
        if claim is None or claim["metadata"]["uid"] != claim_uid or claim["metadata"].get("deletionTimestamp"):
            result.lost.append(f"retained claim {namespace}/{cache_claim_name(name)}")
    for (namespace, name), obj in llmds.items():
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            result.diverged.append(f"{namespace}/{name} still being deleted")
            continue
        observed = (obj.get("status") or {}).get("observedGeneration")
        if observed != meta["generation"]:
            result.diverged.append(f"{namespace}/{name} status at generation {observed} of {meta['generation']}")
        owner = Owner(name, namespace, meta["uid"])
        for (kind, child), manifest in children(LLMDeploymentSpec.model_validate(obj["spec"]), owner).items():
            live = objects.get((kind, namespace, child))
            if manifest is None:
                # A claim is never deleted by the operator: it may hold downloaded weights.
                if live is not None and kind != "PersistentVolumeClaim" and controller_uid(live) == owner.uid:
                    result.diverged.append(f"{kind} {namespace}/{child} should be gone")
            elif live is None:
                result.diverged.append(f"{kind} {namespace}/{child} missing")
            elif not owned(live, stamped(manifest), owner.uid):
                result.diverged.append(f"{kind} {namespace}/{child} not owned by its LLMDeployment")
            elif not matches(stamped(manifest), live):
                result.diverged.append(f"{kind} {namespace}/{child} differs from its rendered manifest")
    per_owner: Counter[tuple[str, str, str]] = Counter()
    for (kind, namespace, name), obj in objects.items():
        owner_uid = controller_uid(obj)
        per_owner[(kind, namespace, owner_uid or obj["metadata"]["labels"][SELECTOR_LABEL])] += 1
        if owner_uid in uids:
            continue
        if owner_uid is None and kind == "PersistentVolumeClaim":
            label = obj["metadata"]["labels"][SELECTOR_LABEL]
            if ((namespace, label) in llmds or ledger.retained.get((namespace, label)) == obj["metadata"]["uid"]
                    or obj["metadata"]["uid"] in ledger.left):
                continue
        result.orphans.append(f"{kind} {namespace}/{name} (owner {owner_uid or 'none'})")
    result.duplicates = [f"{count} {kind}s of {namespace}/{owner}" for (kind, namespace, owner), count in
                         per_owner.items() if count > 1 and kind != "Job"]
    return result


def dry_run_differences(ctx: Context, ledger: Ledger) -> list[str]:
    """Children an apply of the rendered manifest, as the operator's field manager, would still change."""
    dyn = dynamic.DynamicClient(ctx.api)
    found = []
    listed = ctx.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL, _request_timeout=REQUEST_TIMEOUT)
    for obj in listed["items"]:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") or meta["namespace"] not in ledger.namespaces:
            continue
        owner = Owner(meta["name"], meta["namespace"], meta["uid"])
        for (kind, name), manifest in children(LLMDeploymentSpec.model_validate(obj["spec"]), owner).items():
            if manifest is None:
                continue
            resource = dyn.resources.get(api_version=API_VERSIONS[kind], kind=kind)
            try:
                live = resource.get(name=name, namespace=owner.namespace).to_dict()
                applied = resource.server_side_apply(body=stamped(manifest), name=name, namespace=owner.namespace,
                                                     field_manager=FIELD_MANAGER, force_conflicts=True,
                                                     dry_run="All").to_dict()
            except ApiException as exc:
                found.append(f"{kind} {owner.namespace}/{name}: dry-run apply failed: {exc.status} {exc.reason}")
                continue
            if _applied_view(applied) != _applied_view(live):
                found.append(f"{kind} {owner.namespace}/{name} would change on the next apply")
    return found


def _applied_view(obj: Obj) -> Obj:
    meta = obj["metadata"]
    mine = [entry.get("fieldsV1") for entry in meta.get("managedFields") or [] if entry["manager"] == FIELD_MANAGER
            and entry["operation"] == "Apply"]
    return {"labels": meta.get("labels"), "annotations": meta.get("annotations"),
            "ownerReferences": meta.get("ownerReferences"), "spec": obj.get("spec"), "fields": mine}


def converge(ctx: Context, ledger: Ledger, since: float, timeout: float) -> Trial:
    """Wait until the cluster is converged; the trial with the seconds it took from ``since`` (monotonic)."""
    deadline, report_at = since + timeout, time.monotonic() + 15
    while True:
        try:
            found = inspect(ctx, ledger)
            if found.converged:
                found.diverged = dry_run_differences(ctx, ledger)
        except (ApiException, OSError, HTTPError) as exc:
            found = Inspection(diverged=[f"inspection failed: {exc}"])
        if found.converged:
            return Trial(found, time.monotonic() - since)
        if time.monotonic() > deadline:
            ctx.out(f"  not converged after {timeout:.0f}s: {found.summary()}")
            return Trial(found, None)
        if time.monotonic() > report_at:
            ctx.out(f"  still waiting: {found.summary(2)}")
            report_at += 15
        time.sleep(0.5)


def crashes(logs: list[Path]) -> int:
    return sum(path.read_text(errors="replace").count("Traceback") for path in logs if path.exists())


# --- scenario 1: the operator killed at random moments -------------------------------------------


def random_spec(rng: random.Random) -> Obj:
    return {
        "model": {"name": rng.choice(MODELS)},
        "accelerator": {"type": "nvidia", "count": 1},
        "replicas": rng.randint(0, 2),
        "engine": {"maxModelLen": rng.choice([2048, 4096]), "env": [OFFLINE]},
        # ReadWriteMany: the apiserver refuses more than one replica on a ReadWriteOnce cache.
        "cache": {"size": "1Gi", "accessMode": "ReadWriteMany", "retainOnDelete": rng.random() < 0.5},
        "service": {"port": rng.choice([8000, 8080])},
    }


def _env(rng: random.Random) -> list[Obj]:
    extra = [{"name": "VLLM_LOGGING_LEVEL", "value": rng.choice(["INFO", "DEBUG"])},
             {"name": "CHAOS_MARK", "value": str(rng.randint(0, 999))}]
    return [OFFLINE, *rng.sample(extra, rng.randint(0, len(extra)))]


# Field group -> a merge patch of the spec; None removes a field, so removals are exercised too.
EDITS: dict[str, Callable[[random.Random], Obj]] = {
    "replicas": lambda rng: {"replicas": rng.randint(0, 3)},
    "engine args": lambda rng: {"engine": {"maxNumSeqs": rng.choice([None, 64, 256]),
                                           "maxModelLen": rng.choice([2048, 4096, 8192]),
                                           "enforceEager": rng.choice([None, True])}},
    "env": lambda rng: {"engine": {"env": _env(rng)}},
    "resources": lambda rng: {"resources": {"requests": {"cpu": rng.choice([None, "1", "2"])},
                                            "limits": {"memory": rng.choice([None, "16Gi", "32Gi"])}}},
    "cache retainOnDelete": lambda rng: {"cache": {"retainOnDelete": rng.random() < 0.5}},
    "service": lambda rng: {"service": {"port": rng.choice([8000, 8080, 9000]),
                                        "annotations": rng.choice([None, {"example.com/lb": "internal"}])}},
}
OPERATIONS = ["create", *EDITS, "scale", "delete", "namespace delete"]
WEIGHTS = [7, *[2] * len(EDITS), 2, 1.5, 0.3]


class Driver:
    """Runs the seeded operations against the apiserver and keeps the ledger."""

    def __init__(self, ctx: Context, ledger: Ledger) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.namespaces: list[str] = []
        self.serial = 0
        self.done: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def new_namespace(self) -> None:
        self.serial += 1
        name = f"chaos-ops-{self.serial}"
        create_namespace(self.ctx, name)
        self.namespaces.append(name)
        self.ledger.namespaces.add(name)

    def step(self) -> str:
        rng = self.ctx.rng
        operation = rng.choices(OPERATIONS, WEIGHTS)[0] if self.ledger.alive else "create"
        try:
            self._run(operation, rng)
            self.done[operation] += 1
        except ApiException as exc:
            if exc.status not in (404, 409, 422):
                raise
            # The apiserver's verdict (a spec its rules refuse, an object gone meanwhile) is no fault of the operator.
            self.refused[f"{operation} ({exc.status})"] += 1
        return operation

    def _run(self, operation: str, rng: random.Random) -> None:
        custom = self.ctx.custom
        if operation == "create":
            namespace = rng.choice(self.namespaces)
            self.serial += 1
            name = f"m{self.serial}"
            body = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
                    "metadata": {"name": name, "namespace": namespace}, "spec": random_spec(rng)}
            created = custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body,
                                                             _request_timeout=REQUEST_TIMEOUT)
            self.ledger.alive[(namespace, name)] = created["metadata"]["uid"]
            return
        if operation == "namespace delete":
            namespace = rng.choice(self.namespaces)
            self.namespaces.remove(namespace)
            delete_namespace(self.ctx, namespace)
            for store in (self.ledger.alive, self.ledger.retained):
                for key in [k for k in store if k[0] == namespace]:
                    del store[key]
            self.new_namespace()
            return
        namespace, name = key = rng.choice(sorted(self.ledger.alive))
        if operation == "delete":
            self._record_claim(key)
            custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                                                   _request_timeout=REQUEST_TIMEOUT)
            del self.ledger.alive[key]
        elif operation == "scale":  # what `kubectl scale llmd NAME --replicas N` sends
            custom.patch_namespaced_custom_object_scale(api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                                                        {"spec": {"replicas": rng.randint(0, 3)}},
                                                        _request_timeout=REQUEST_TIMEOUT)
        else:
            custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                                                  {"spec": EDITS[operation](rng)}, _request_timeout=REQUEST_TIMEOUT)

    def _record_claim(self, key: Key) -> None:
        """Before a delete: will the garbage collector keep the cache claim? Only if retainOnDelete=true was applied
        (the claim has no owner); the ledger says which claims must survive."""
        namespace, name = key
        obj = self.ctx.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                                                           _request_timeout=REQUEST_TIMEOUT)
        try:
            claim = self.ctx.core.read_namespaced_persistent_volume_claim(cache_claim_name(name), namespace,
                                                                          _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return
        retain = (obj["spec"].get("cache") or {}).get("retainOnDelete", False)
        unowned = not claim.metadata.owner_references
        if retain and unowned:
            self.ledger.retained[key] = claim.metadata.uid
        elif unowned:
            self.ledger.left.add(claim.metadata.uid)
        elif retain:
            self.ledger.collected += 1

    def forget_retained(self, key: Key) -> None:
        """A new LLMDeployment of the same name adopts the kept claim; its own retainOnDelete decides from now on."""
        self.ledger.retained.pop(key, None)


def kill(process: OperatorProcess) -> None:
    assert process.process is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.process.pid, signal.SIGKILL)
    process.process.wait()


def operator_kills(ctx: Context) -> FaultResult:
    result = FaultResult("operator SIGKILL during mixed operations")
    ledger = Ledger()
    driver = Driver(ctx, ledger)
    for _ in range(3):
        driver.new_namespace()
    operator = ctx.operator("kills").start()
    kills, unexpected = 0, 0
    per_round = ctx.size.operations // ctx.size.rounds
    for round_no in range(ctx.size.rounds):
        for _ in range(per_round):
            before = set(ledger.alive)
            driver.step()
            for key in set(ledger.alive) - before:
                driver.forget_retained(key)
            if ctx.rng.random() < 0.4:
                # A random moment: mid-reconcile of what was just sent, or soon after a restart's resync.
                time.sleep(ctx.rng.uniform(0.0, 1.5))
                if operator.process is not None and operator.process.poll() is not None:
                    unexpected += 1
                kill(operator)
                kills += 1
                for _ in range(ctx.rng.choice([0, 0, 1, 2])):  # operations while no operator runs
                    driver.step()
                operator = ctx.operator("kills").start()
            else:
                time.sleep(ctx.rng.uniform(0.0, 0.3))
        trial = converge(ctx, ledger, time.monotonic(), ctx.size.timeout)
        ctx.out(f"  round {round_no + 1}: {len(ledger.alive)} LLMDeployments, {kills} kills so far, "
                f"{'converged in %.1f s' % trial.seconds if trial.seconds is not None else 'NOT converged'}")
        result.trials.append(trial)
    if operator.process is not None and operator.process.poll() is not None:
        unexpected += 1
    operator.stop()
    for namespace in driver.namespaces:
        delete_namespace(ctx, namespace)
    result.crashes = crashes([operator.log_file]) + unexpected
    result.remarks = [f"{sum(driver.done.values())} operations ({', '.join(f'{k} {v}' for k, v in sorted(driver.done.items()))})",
                      f"{kills} kills", f"{len(ledger.retained)} claims kept by retainOnDelete checked"]
    if driver.refused:
        result.remarks.append(f"refused by the apiserver: {dict(driver.refused)}")
    if ledger.collected or ledger.left:
        result.remarks.append(f"deleted before the operator applied retainOnDelete: {ledger.collected} claims "
                              f"collected (true not applied yet), {len(ledger.left)} left (false not applied yet)")
    return result


# --- scenario 2: kube-apiserver and etcd restarted under a burst ---------------------------------


def burst_spec(index: int) -> Obj:
    return {
        "model": {"name": MODELS[index % len(MODELS)]},
        "accelerator": {"type": "nvidia", "count": 1},
        "replicas": index % 2,
        "engine": {"maxModelLen": 4096, "env": [OFFLINE]},
        # Every third one with a cache claim, which the local-runtime agent provisions.
        "cache": {"enabled": index % 3 == 0, "size": "1Gi", "accessMode": "ReadWriteMany"},
    }


def populate(ctx: Context, namespace: str, prefix: str, specs: list[Obj]) -> Ledger:
    """A new namespace with an LLMDeployment <prefix><i> of each spec; the ledger that expects them."""
    create_namespace(ctx, namespace)
    ledger = Ledger(namespaces={namespace})
    for index, spec in enumerate(specs):
        body = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
                "metadata": {"name": f"{prefix}{index}", "namespace": namespace}, "spec": spec}
        ledger.alive[(namespace, f"{prefix}{index}")] = create_retrying(ctx, namespace, body)
    return ledger


def create_retrying(ctx: Context, namespace: str, body: Obj, timeout: float = 180) -> str:
    """Create through an apiserver that may be down or without etcd; the uid of what exists afterwards."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            created = ctx.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL,
                                                                 body, _request_timeout=REQUEST_TIMEOUT)
            return str(created["metadata"]["uid"])
        except ApiException as exc:
            if exc.status == 409:  # an earlier attempt landed after all
                found = ctx.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL,
                                                                body["metadata"]["name"], _request_timeout=REQUEST_TIMEOUT)
                return str(found["metadata"]["uid"])
            if exc.status < 500 and exc.status != 429:
                raise
        except (OSError, HTTPError):  # refused, reset or timed out
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not create {body['metadata']['name']} within {timeout:.0f}s")
        time.sleep(0.2)


def restart_under_burst(ctx: Context, component: str, operator: OperatorProcess, trial_no: int) -> Trial:
    namespace = f"chaos-burst-{component}-{trial_no}"
    create_namespace(ctx, namespace)
    ledger = Ledger(namespaces={namespace})
    outage: dict[str, float] = {}

    def fault() -> None:
        outage["down"], outage["up"] = restart(ctx.cluster, component)

    faulting = threading.Thread(target=fault)
    for index in range(ctx.size.burst):
        if index == ctx.size.burst // 2:
            faulting.start()
        name = f"b{index}"
        body = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
                "metadata": {"name": name, "namespace": namespace}, "spec": burst_spec(index)}
        ledger.alive[(namespace, name)] = create_retrying(ctx, namespace, body)
    faulting.join()
    since = max(outage["up"], time.monotonic())
    trial = converge(ctx, ledger, since, ctx.size.timeout)
    trial.notes["outage"] = outage["up"] - outage["down"]
    ctx.out(f"  {component} restart {trial_no}: down {trial.notes['outage']:.1f} s, "
            f"{'converged %.1f s after the burst' % trial.seconds if trial.seconds is not None else 'NOT converged'}"
            f"{'' if operator.process is not None and operator.process.poll() is None else '; the operator EXITED'}")
    # A big burst's deletion is waited for, so that it does not load the next trial.
    delete_namespace(ctx, namespace, wait=ctx.size.timeout if ctx.size.burst > 100 else 0.0)
    return trial


def control_plane_restarts(ctx: Context) -> list[FaultResult]:
    operator = ctx.operator("restarts").start()
    assert operator.process is not None
    pid = operator.process.pid
    results = []
    for component in ("kube-apiserver", "etcd"):
        result = FaultResult(f"{component} restarted during a burst of {ctx.size.burst} LLMDeployments")
        for trial_no in range(ctx.size.restarts):
            result.trials.append(restart_under_burst(ctx, component, operator, trial_no))
        outages = [t.notes["outage"] for t in result.trials]
        result.remarks.append(f"down {spread(outages)}; "
                              "time counted from the last create or the return of the apiserver, whichever is later")
        results.append(result)
    alive = operator.process.poll() is None and operator.process.pid == pid
    operator.stop()
    exits = 0 if alive else 1
    for result in results:
        result.crashes = crashes([operator.log_file]) + exits
        if not alive:
            result.remarks.append("the operator process exited")
        else:
            result.remarks.append("same operator process throughout")
    return results


# --- scenario 3: leader failover -----------------------------------------------------------------

AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [
        # The Lease's body names its holder.
        {"level": "Request", "users": list(REPLICA_USERS), "verbs": ["create", "update", "patch"],
         "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]}]},
        {"level": "Metadata", "users": list(REPLICA_USERS),
         "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
        {"level": "None"},
    ],
}


@dataclass(frozen=True)
class Write:
    user: str
    at: float  # apiserver's time the request was received (epoch seconds)
    done: float  # and answered
    what: str
    holder: str | None  # for Lease writes: the holder it names


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp.rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


def audit_writes(log: Path) -> list[Write]:
    writes = []
    for line in log.read_text(errors="replace").splitlines():
        event = json.loads(line)
        if event.get("stage") != "ResponseComplete" or (event.get("responseStatus") or {}).get("code", 500) >= 300:
            continue
        ref = event.get("objectRef") or {}
        lease = ref.get("resource") == "leases"
        holder = ((event.get("requestObject") or {}).get("spec") or {}).get("holderIdentity") if lease else None
        what = "/".join(filter(None, [ref.get("resource"), ref.get("subresource"), ref.get("namespace"),
                                      ref.get("name")]))
        writes.append(Write(event["user"]["username"], _epoch(event["requestReceivedTimestamp"]),
                            _epoch(event["stageTimestamp"]), f"{event['verb']} {what}", holder if lease else None))
    return sorted(writes, key=lambda w: w.done)


def writes_outside_term(writes: list[Write], identities: dict[str, str]) -> list[Write]:
    """Writes by a replica that did not hold the Lease when the apiserver received them (holder as of the last
    Lease write answered before that)."""
    lease_writes = [w for w in writes if w.holder is not None]
    wrong = []
    for write in writes:
        if write.holder is not None:
            continue
        before = [w for w in lease_writes if w.done <= write.at]
        if (identities.get(before[-1].holder or "") if before else None) != write.user:
            wrong.append(write)
    return wrong


def describe(write: Write, writes: list[Write], identities: dict[str, str]) -> str:
    before = [w for w in writes if w.holder is not None and w.done <= write.at]
    holder = identities.get(before[-1].holder or "") if before else None
    return f"{write.user} {write.what} at {write.at:.3f} while {holder or 'nobody'} held the Lease"


def replica_kubeconfigs(ctx: Context) -> dict[str, Path]:
    """A client certificate and kubeconfig for each replica, so the audit log tells their writes apart."""
    authority = Authority(ctx.cluster.certs)
    paths = {}
    for user in REPLICA_USERS:
        stem = user.replace(":", "-")
        pair = authority.client(stem, Identity(user, ("system:masters",)))
        path = ctx.work_dir / f"{stem}.kubeconfig"
        ctx.cluster._write_kubeconfig(path, user, pair)
        paths[user] = path
    return paths


def lease_holder(ctx: Context) -> Obj:
    lease = client.CoordinationV1Api(ctx.api).read_namespaced_lease(LEASE_NAME, LEASE_NAMESPACE,
                                                                    _request_timeout=REQUEST_TIMEOUT)
    return {"holder": lease.spec.holder_identity, "acquired": lease.spec.acquire_time}


class Editor(threading.Thread):
    """Edits the LLMDeployments all the time, so that whoever leads has writes to make."""

    def __init__(self, ctx: Context, keys: list[Key]) -> None:
        super().__init__(daemon=True)
        self.ctx, self.keys, self.stopping = ctx, keys, threading.Event()
        self.rng = random.Random(ctx.rng.random())

    def run(self) -> None:
        while not self.stopping.wait(0.3):
            namespace, name = self.rng.choice(self.keys)
            with contextlib.suppress(ApiException, OSError, HTTPError):
                self.ctx.custom.patch_namespaced_custom_object(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"spec": EDITS["env"](self.rng)},
                    _request_timeout=REQUEST_TIMEOUT)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def leader_failover(ctx: Context) -> list[FaultResult]:
    audit_log = ctx.work_dir / "audit.log"
    policy = ctx.work_dir / "audit-policy.yaml"
    policy.write_text(yaml.safe_dump(AUDIT_POLICY))
    restart(ctx.cluster, "kube-apiserver", (f"--audit-policy-file={policy}", f"--audit-log-path={audit_log}",
                                            "--audit-log-format=json", "--audit-log-mode=blocking"), grace=1.0)
    kubeconfigs = replica_kubeconfigs(ctx)
    create_namespace(ctx, LEASE_NAMESPACE)
    namespace = "chaos-failover"
    ledger = populate(ctx, namespace, "f", [{**burst_spec(index), "cache": {"enabled": False}} for index in range(8)])
    election = ["--leader-elect", "--leader-election-namespace", LEASE_NAMESPACE, "--leader-election-id", LEASE_NAME]
    replicas = {user: ctx.operator(f"replica-{user[-1]}", election, kubeconfigs[user]).start() for user in REPLICA_USERS}
    identities: dict[str, str] = {}  # Lease holder identity -> user

    def identity_of(user: str) -> str:
        process = replicas[user].process
        assert process is not None
        return f"{os.uname().nodename}_{process.pid}"

    def refresh_identities() -> None:
        identities.update({identity_of(user): user for user in REPLICA_USERS})

    refresh_identities()
    until("a leader", lambda: lease_holder(ctx)["holder"] in identities, 60)
    converge(ctx, ledger, time.monotonic(), ctx.size.timeout)
    results = []
    logs: list[Path] = [p.log_file for p in replicas.values()]
    for how in ("SIGKILL", "SIGSTOP"):
        result = FaultResult(f"leader {'killed (SIGKILL)' if how == 'SIGKILL' else 'cut off (SIGSTOP, then SIGCONT)'}")
        failovers, way_started = [], time.time()
        for _ in range(ctx.size.failovers):
            editor = Editor(ctx, sorted(ledger.alive))
            editor.start()
            time.sleep(ctx.rng.uniform(2, 5))
            leader_user = identities[lease_holder(ctx)["holder"]]
            other = next(u for u in REPLICA_USERS if u != leader_user)
            leader = replicas[leader_user]
            assert leader.process is not None
            fault_at, since = time.time(), time.monotonic()
            if how == "SIGKILL":
                kill(leader)
            else:
                os.killpg(leader.process.pid, signal.SIGSTOP)
            taken = until("the standby to take the Lease", lambda: (
                (held := lease_holder(ctx))["holder"] == identity_of(other) and held), 90, 0.1)
            failovers.append(taken["acquired"].timestamp() - fault_at)
            time.sleep(2)  # the new leader at work while the editor goes on
            if how == "SIGKILL":
                replicas[leader_user] = ctx.operator(f"replica-{leader_user[-1]}", election,
                                                     kubeconfigs[leader_user]).start()
                refresh_identities()
            else:
                os.killpg(leader.process.pid, signal.SIGCONT)
                time.sleep(3)  # the woken replica finds it lost the Lease
            editor.stop()
            result.trials.append(converge(ctx, ledger, since, ctx.size.timeout))
        # Each way is judged on its own writes, against the Lease's whole history.
        writes = audit_writes(audit_log)
        wrong = [w for w in writes_outside_term(writes, identities) if w.at >= way_started]
        judged = sum(1 for w in writes if w.holder is None and w.at >= way_started)
        lines = [describe(w, writes, identities) for w in wrong]
        for line in lines[:10]:
            ctx.out(f"  write outside the term: {line}")
        # A write by the wrong replica is a duplicate writer: counted with the duplicates.
        result.trials[-1].inspection.duplicates.extend(f"write outside the term: {line}" for line in lines)
        result.remarks = [f"failover {spread(failovers)} (fault to the standby's acquireTime)",
                          f"writes outside the writer's term: {len(wrong)} of {judged}",
                          "converge time from the fault"]
        results.append(result)
    for replica in replicas.values():
        replica.stop()
    logs = [p.log_file for p in replicas.values()]
    for result in results:
        result.crashes = crashes(list(dict.fromkeys(logs)))
    delete_namespace(ctx, namespace)
    return results


# --- scenario 4: children edited or deleted by hand, engines broken -----------------------------

# Hand-made faults of a child the operator must undo: (kind, verb, what a person sends).
HAND_FAULTS: dict[str, Callable[[Context, str, str], None]] = {
    "Deployment deleted": lambda ctx, ns, name: client.AppsV1Api(ctx.api).delete_namespaced_deployment(name, ns),
    "Service deleted": lambda ctx, ns, name: ctx.core.delete_namespaced_service(name, ns),
    "Deployment edited": lambda ctx, ns, name: client.AppsV1Api(ctx.api).patch_namespaced_deployment(
        name, ns, [{"op": "replace", "path": "/spec/replicas", "value": 5},
                   {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "example.com/other:1"}],
        field_manager="kubectl-edit"),
    # An entry only its own manager can remove: the operator must leave it, and not count it as drift.
    "env var added (kubectl set env)": lambda ctx, ns, name: client.AppsV1Api(ctx.api).patch_namespaced_deployment(
        name, ns, {"spec": {"template": {"spec": {"containers": [{"name": "vllm", "env": [
            {"name": "ADDED_BY_HAND", "value": "1"}]}]}}}}, field_manager="kubectl-set"),
    "Service edited": lambda ctx, ns, name: ctx.core.patch_namespaced_service(
        name, ns, [{"op": "replace", "path": "/spec/selector", "value": {"app": "someone-else"}}],
        field_manager="kubectl-edit"),
}
ENGINE_FAULTS = ("dead", "garbage", "hang")


def engine_admin(ctx: Context, method: str, ip: str, body: Obj | None = None) -> None:
    """The simulated engines' admin endpoint (simengines.py): break or mend one engine."""
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{ctx.cluster.ports.simengines_admin}/engines/{ip}/fault",
                                     data=json.dumps(body or {}).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def engine_health(ctx: Context, namespace: str, name: str, pod: str) -> tuple[bool, bool]:
    """(the status names the Pod's engine unhealthy, the LLMDeployment is Ready with no unhealthy engine)."""
    obj = ctx.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                                                  _request_timeout=REQUEST_TIMEOUT)
    status = obj.get("status") or {}
    conditions = json.dumps(status.get("conditions") or [])
    return f"pod {pod}: " in conditions, status.get("phase") == "Ready" and "EngineUnhealthy" not in conditions


def hand_faults(ctx: Context) -> list[FaultResult]:
    namespace = "chaos-hand"
    ledger = populate(ctx, namespace, "h", [{**burst_spec(index), "replicas": 1 + index % 2, "cache": {"enabled": False}}
                                            for index in range(6)])
    operator = ctx.operator("hand").start()
    until("every LLMDeployment Ready", lambda: all(engine_health(ctx, *key, "-")[1] for key in ledger.alive),
          ctx.size.timeout, 0.5)
    children_result = FaultResult("children deleted or edited by hand")
    engines_result = FaultResult(f"engine dead, /metrics garbage or hanging (scrape interval {SCRAPE_INTERVAL:g} s)")
    reflected: list[float] = []
    late = 0
    done: Counter[str] = Counter()
    for trial_no in range(ctx.size.rounds * 2):
        namespace, name = ctx.rng.choice(sorted(ledger.alive))
        if trial_no % 2 == 0:
            fault = ctx.rng.choice(sorted(HAND_FAULTS))
            since = time.monotonic()
            HAND_FAULTS[fault](ctx, namespace, name)
            children_result.trials.append(converge(ctx, ledger, since, ctx.size.timeout))
            done[fault] += 1
            continue
        fault = ctx.rng.choice(ENGINE_FAULTS)
        pods = ctx.core.list_namespaced_pod(namespace, label_selector=f"{SELECTOR_LABEL}={name}",
                                            _request_timeout=REQUEST_TIMEOUT).items
        pod = next(p for p in pods if p.status.pod_ip and not p.metadata.deletion_timestamp)
        since = time.monotonic()
        engine_admin(ctx, "PUT", pod.status.pod_ip, {"fault": fault})
        try:
            until(f"{fault} engine of {pod.metadata.name} in the status",
                  lambda: engine_health(ctx, namespace, name, pod.metadata.name)[0], ctx.size.timeout)
            reflected.append(time.monotonic() - since)
            late += reflected[-1] > 2 * SCRAPE_INTERVAL
        except TimeoutError:
            ctx.out(f"  the status never named the {fault} engine of {pod.metadata.name}")
            engines_result.trials.append(Trial(Inspection(diverged=[f"{fault} engine not reported"]), None))
            engine_admin(ctx, "DELETE", pod.status.pod_ip)
            continue
        mended = time.monotonic()
        engine_admin(ctx, "DELETE", pod.status.pod_ip)
        try:
            until(f"{name} Ready again", lambda: engine_health(ctx, namespace, name, pod.metadata.name)[1],
                  ctx.size.timeout)
            engines_result.trials.append(Trial(Inspection(), time.monotonic() - mended))
        except TimeoutError:
            engines_result.trials.append(Trial(Inspection(diverged=[f"{name} not Ready after the {fault} engine "
                                                                    "was mended"]), None))
        done[fault] += 1
    operator.stop()
    delete_namespace(ctx, namespace)
    for result in (children_result, engines_result):
        result.crashes = crashes([operator.log_file])
    children_result.remarks = [", ".join(f"{k} {v}" for k, v in sorted(done.items()) if k in HAND_FAULTS),
                               "converge time from the edit"]
    engines_result.remarks = [", ".join(f"{k} {v}" for k, v in sorted(done.items()) if k in ENGINE_FAULTS),
                              f"in the status {spread(reflected)} after the fault ({late} later than two scrape "
                              "intervals)", "converge time: Ready again after the engine was mended"]
    return [children_result, engines_result]


# --- the whole suite -----------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Context], list[FaultResult]]] = {
    "kills": lambda ctx: [operator_kills(ctx)],
    "restarts": control_plane_restarts,
    "failover": leader_failover,
    "hand": hand_faults,
}


def run(size: Size, seed: int, scenarios: list[str] | None = None, out: Out = print,
        keep: bool = False) -> list[FaultResult]:
    out(f"fault suite, size {size.name}, seed {seed} (replay: --seed {seed})")
    results: list[FaultResult] = []
    with own_cluster(out, keep) as (cluster, work_dir):
        with cluster.api_client() as api_client:
            install_crd(api_client)
            ctx = Context(cluster, api_client, work_dir, random.Random(seed), out, size)
            try:
                for name in scenarios or list(SCENARIOS):
                    started = time.monotonic()
                    out(f"scenario {name}")
                    results += SCENARIOS[name](ctx)
                    out(f"scenario {name} took {time.monotonic() - started:.0f} s")
            finally:
                ctx.stop_operators()
    return results


def docs_section(results: list[FaultResult], size: Size, seed: int, seconds: float) -> str:
    command = f"make chaos  # or: PYTHONPATH=hack python -m devcluster.chaos --size {size.name} --seed {seed}"
    return f"""## Fault suite

[`hack/devcluster/chaos.py`](../hack/devcluster/chaos.py) injects faults on a local cluster of its own (ports from
{DEFAULT_PORT_BASE}, Pods in {DEFAULT_POD_CIDR}, simulated engines on kwok nodes) and then waits for the operator to
converge: every LLMDeployment's children are what `render.manifests.children` renders from its spec (compared as
the operator's drift check compares them, and by a dry-run server-side apply of the rendered manifest as the
operator's field manager, which must change nothing, removals included), every status has
`observedGeneration == metadata.generation`, no child is duplicated or outlives its owner, no LLMDeployment is
lost and no cache claim kept by `retainOnDelete: true` is deleted. Crashes are tracebacks in the operator's log and
operator exits nobody caused. Faults:

- **Operator SIGKILL**: a seeded sequence of operations (create; edits of replicas, engine args, env, resources,
  `cache.retainOnDelete` and the service, removals included; `kubectl scale` through the scale subresource;
  delete; namespace delete), the operator killed after four in ten of them at a random moment up to 1.5 s later,
  up to two more operations sent while it is down, then restarted. A trial is one round of operations; convergence
  is timed from its last operation.
- **kube-apiserver / etcd restarted** (SIGTERM, then started again with the same command line) once half of a
  burst of LLMDeployments is created; the rest is created as soon as the apiserver answers again. The operator is
  the same process throughout and must reconnect by itself.
- **Leader failover**: two replicas with `--leader-elect`, each with a client certificate of its own, while the
  LLMDeployments are edited every 0.3 s; the leader is killed, or stopped with SIGSTOP and woken after the standby
  took over. Every write either replica made (the apiserver's audit log) must fall within that replica's term as
  the Lease's writes record it; a write outside it counts as a duplicate.
- **Hand edits and broken engines**: a Deployment or Service deleted, or edited with `kubectl-edit`'s field manager
  (replicas and image; the Service's selector), must be put back, and an env var added with `kubectl set env` left
  alone without counting as drift; a simulated engine that stops listening, whose
  `/metrics` answers garbage or never answers, must be named in the status (reported against two scrape
  intervals) and the LLMDeployment must be Ready again once the engine is mended.

Run on {datetime.now(UTC).strftime('%Y-%m-%d')}, {os.cpu_count()} cores, seed {seed}, {seconds / 60:.0f} minutes:

```sh
{command}
make chaos CHAOS_SIZE=ci     # the CI size, as tests/test_chaos.py runs it
```

{table(results)}
"""


def write_docs(section: str, path: Path = DOCS) -> None:
    """Replace the "## Fault suite" section of ``path`` (up to the next heading of its level) with ``section``."""
    text = path.read_text()
    pattern = re.compile(r"^## Fault suite\n.*?(?=^## |\Z)", re.S | re.M)
    if not pattern.search(text):
        raise RuntimeError(f"no '## Fault suite' section in {path}")
    path.write_text(pattern.sub(lambda _m: section + "\n", text, count=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="ci")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a random seed, printed)")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="only these (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's folder and the operator logs")
    parser.add_argument("--write-docs", action="store_true", help="rewrite the Fault suite section of docs/reliability.md")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    size = SIZES[args.size]
    # Stopped by SIGTERM (or Ctrl-C), the clean-up still stops the operators and the suite's cluster.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    started = time.monotonic()
    results = run(size, seed, args.scenario, lambda line: print(line, flush=True), args.keep)
    print(table(results))
    print(f"seed {seed}; {time.monotonic() - started:.0f} s")
    if args.write_docs:
        write_docs(docs_section(results, size, seed, time.monotonic() - started))
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
