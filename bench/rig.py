"""What every measurement runs on: the cluster, the CRD, a simulated node of the benchmark's own, the
operator as a local process, and clients for the apiserver and for plain local HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from kubernetes import client, config

from bench.kube import BenchKube, Obj
from devcluster import engine, nodes
from devcluster.hub import LocalHub, default_repos
from devcluster.cluster import REPO_ROOT
from devcluster.operatorproc import OperatorProcess
from vllm_operator import api
from vllm_operator.kube import Credentials, KubeError

CRD_FILE = REPO_ROOT / "crds" / f"{api.GROUP}_{api.PLURAL}.yaml"
# Short, so the idle and busy windows hold several sweeps.
SCRAPE_INTERVAL = 5.0
BENCH_LABEL = "vllm-operator.io/bench"
# kwok's nodes take 110 pods each; the fleet gets one node of its own that holds all of its pods.
NODE = "bench-0"
NODE_ADDRESS = "127.0.20.40"
NAMESPACE_TIMEOUT = 600.0
# A fleet of thousands takes the namespace controller and the garbage collector longer to remove than
# NAMESPACE_TIMEOUT: this much per LLMDeployment is allowed then (unmeasured beyond 1,000, so generous).
NAMESPACE_SECONDS_PER_LLMDEPLOYMENT = 0.25

Out = Callable[[str], None]


def llmdeployment(name: str, namespace: str) -> Obj:
    """The LLMDeployment every scale measurement applies: one CPU replica on the benchmark's node, of a fleet
    whose caches are filled already (HF_HUB_OFFLINE: no download Job), as the bench measures the control plane."""
    return {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "vllm-operator/tiny-llama"},
            "accelerator": {"type": "cpu"},
            "engine": {"env": [{"name": "HF_HUB_OFFLINE", "value": "1"}]},
            "cache": {"size": "1Gi"},
            "nodeSelector": {BENCH_LABEL: "true"},
        },
    }


def kubeconfig_answers(path: Path) -> bool:
    async def probe() -> bool:
        kube = BenchKube(Credentials.load(str(path)))
        try:
            await asyncio.wait_for(kube.request("GET", "/version"), 5)
            return True
        except (KubeError, TimeoutError):
            return False
        finally:
            await kube.close()

    try:
        return asyncio.run(probe())
    except Exception:  # noqa: BLE001 - an unreadable kubeconfig is no usable cluster either
        return False


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def peak_rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmHWM")


def rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmRSS")


@dataclass
class Rig:
    kubeconfig: Path
    kube: BenchKube
    http: aiohttp.ClientSession
    api_client: client.ApiClient  # synchronous, for the devcluster helpers
    operator: OperatorProcess
    out: Out
    largest: int  # the most LLMDeployments a namespace of this rig holds
    hub: LocalHub  # what the operator and its download Jobs take for the Hugging Face hub

    @property
    def operator_pid(self) -> int:
        assert self.operator.process is not None
        return self.operator.process.pid

    async def get_text(self, url: str) -> str:
        async with self.http.get(url) as response:
            response.raise_for_status()
            return await response.text()

    async def post(self, url: str) -> None:
        async with self.http.post(url) as response:
            response.raise_for_status()

    @contextlib.asynccontextmanager
    async def namespace(self, name: str) -> AsyncIterator[str]:
        """A new, empty namespace, deleted (and waited for) on the way out so it cannot slow what follows."""
        await self.delete_namespace(name)
        await self.kube.apply_at(f"/api/v1/namespaces/{name}", {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {BENCH_LABEL: "true"}}})
        # Pods are refused until the service-account controller has created `default`.
        await self.poll(f"ServiceAccount default in {name}",
                        lambda: self.kube.get_or_none(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 60)
        try:
            yield name
        finally:
            await self.delete_namespace(name)

    async def delete_namespace(self, name: str) -> None:
        path = f"/api/v1/namespaces/{name}"
        with contextlib.suppress(KubeError):
            await self.kube.request("DELETE", path)
        started = time.monotonic()
        await self.poll(f"namespace {name} gone", lambda: _absent(self.kube, path),
                        max(NAMESPACE_TIMEOUT, self.largest * NAMESPACE_SECONDS_PER_LLMDEPLOYMENT))
        if time.monotonic() - started > 5:
            self.out(f"  namespace {name} deleted in {time.monotonic() - started:.0f}s")

    @staticmethod
    async def poll(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while not (found := await probe()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached within {timeout:.0f}s")
            await asyncio.sleep(interval)
        return found


async def _absent(kube: BenchKube, path: str) -> bool:
    return await kube.get_or_none(path) is None


async def _install_crd(kube: BenchKube) -> None:
    manifest = yaml.safe_load(CRD_FILE.read_text())
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{manifest['metadata']['name']}"
    await kube.apply_at(path, manifest)

    async def established() -> bool:
        conditions = ((await kube.request("GET", path)).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    await Rig.poll("the CRD Established", established, 30, 0.2)


async def _add_node(kube: BenchKube, api_client: client.ApiClient, pods: int) -> None:
    manifest: Obj = nodes.SimulatedNode(NODE, NODE_ADDRESS, labels={BENCH_LABEL: "true"}).manifest()
    for resources in ("capacity", "allocatable"):
        manifest["status"][resources]["pods"] = str(pods)
    await kube.apply_at(f"/api/v1/nodes/{NODE}", {k: v for k, v in manifest.items() if k != "status"})
    await kube.apply_at(f"/api/v1/nodes/{NODE}/status", manifest)

    async def schedulable() -> bool:
        return NODE in await asyncio.to_thread(nodes.schedulable_nodes, api_client, [NODE])

    await Rig.poll(f"node {NODE} Ready (is kwok running?)", schedulable, 60)


@contextlib.asynccontextmanager
async def rig(kubeconfig: Path, largest: int, namespaces: list[str], out: Out) -> AsyncIterator[Rig]:
    """The operator serves ``namespaces`` only: on a shared cluster it must neither serve others' LLMDeployments
    (their objects would count in its memory, CPU and writes) nor write their statuses."""
    kube = BenchKube(Credentials.load(str(kubeconfig)), max_connections=64)
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    log_file = Path(tempfile.mkdtemp(prefix="vllm-operator-bench-")) / "operator.log"
    scope = [f"--namespace={namespace}" for namespace in namespaces]
    # The local hub answers the fit check and the download Jobs of the cold-start measurement.
    with LocalHub(default_repos(engine.model_snapshot())).serve() as hub:
        operator = OperatorProcess(kubeconfig, log_file,
                                   ["--scrape-interval", f"{SCRAPE_INTERVAL:g}", "--log-level", "warning", *scope],
                                   env=hub.env())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            setting = Rig(kubeconfig, kube, http, api_client, operator, out, largest, hub)
            try:
                await _install_crd(kube)
                # Only this run's own leftovers: another run of other measurements may share the cluster.
                for leftover in (await kube.request("GET", "/api/v1/namespaces",
                                                    params={"labelSelector": BENCH_LABEL}))["items"]:
                    if leftover["metadata"]["name"] in namespaces:
                        await setting.delete_namespace(leftover["metadata"]["name"])
                # Room for the largest fleet and some to spare on one node.
                await _add_node(kube, api_client, largest + 100)
                await asyncio.to_thread(operator.start)
                out(f"operator pid {setting.operator_pid}, log {log_file}")
                yield setting
            finally:
                operator.stop()
                with contextlib.suppress(KubeError):
                    await kube.request("DELETE", f"/api/v1/nodes/{NODE}")
                await kube.close()
                api_client.close()
