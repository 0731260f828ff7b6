"""Registers the Node and keeps it Ready: a Lease renewal and a status heartbeat every few seconds."""

from __future__ import annotations

import os
import platform
import shutil
import threading
from pathlib import Path

from kubernetes import client

from devcluster.binaries import KUBERNETES_VERSION
from devcluster.localruntime.kube import MERGE, TIMEOUT, Obj, call, is_not_found, micro_timestamp, timestamp
from devcluster.localruntime.log import event

LOCAL_RUNTIME_LABEL = "vllm-operator.io/local-runtime"
# Only pods that ask for real processes run here; any other small pod would otherwise fit too.
LOCAL_RUNTIME_TAINT = {"key": LOCAL_RUNTIME_LABEL, "value": "true", "effect": "NoSchedule"}
MAX_PODS = 16
HEARTBEAT_SECONDS = 10
# The Lease is the liveness signal; the full status only needs a refresh now and then (kubelet: 5 min).
STATUS_EVERY_HEARTBEATS = 6
LEASE_SECONDS = 40
RUNTIME_VERSION = "localruntime://0.1.0"
KUBELET_VERSION = f"{KUBERNETES_VERSION}-localruntime"


def _memory_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise RuntimeError("MemTotal missing from /proc/meminfo")


class NodeAgent:
    def __init__(self, api: client.ApiClient, name: str, state_dir: Path, stop: threading.Event,
                 kubelet_port: int = 0) -> None:
        self.name = name
        self.kubelet_port = kubelet_port
        self.state_dir = state_dir
        self.stop = stop
        self.core = client.CoreV1Api(api)
        self.leases = client.CoordinationV1Api(api)
        self._ready_since = timestamp()

    def _resources(self) -> dict[str, str]:
        return {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{_memory_kib()}Ki",
            "pods": str(MAX_PODS),
            "ephemeral-storage": str(shutil.disk_usage(self.state_dir).total),
        }

    def _conditions(self, ready: bool, reason: str, message: str) -> list[Obj]:
        now = timestamp()
        quiet = [
            {"type": kind, "status": "False", "reason": f"KubeletHasSufficient{short}",
             "message": f"no {short.lower()} pressure is reported by the local runtime",
             "lastHeartbeatTime": now, "lastTransitionTime": self._ready_since}
            for kind, short in (("MemoryPressure", "Memory"), ("DiskPressure", "Disk"), ("PIDPressure", "PID"))
        ]
        ready_condition = {"type": "Ready", "status": "True" if ready else "False", "reason": reason,
                           "message": message, "lastHeartbeatTime": now, "lastTransitionTime": self._ready_since}
        return [*quiet, ready_condition]

    def _labels(self) -> dict[str, str]:
        return {
            LOCAL_RUNTIME_LABEL: "true",
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine()),
        }

    def register(self) -> None:
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": self._labels()},
                "spec": {"taints": [LOCAL_RUNTIME_TAINT]}}
        try:
            call(self.core.create_node, body)
            event("node.registered", node=self.name)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_node(self.name, {"metadata": {"labels": self._labels()}, "spec": body["spec"]},
                                 _request_timeout=TIMEOUT)
            event("node.reclaimed", node=self.name)
        self._ready_since = timestamp()
        self.post_status()

    def post_status(self) -> None:
        resources = self._resources()
        uname = os.uname()
        status = {
            "capacity": resources,
            "allocatable": resources,
            "conditions": self._conditions(True, "KubeletReady", "local runtime agent is posting ready status"),
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": uname.release,
                "osImage": platform.platform(), "containerRuntimeVersion": RUNTIME_VERSION,
                "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": self._labels()["kubernetes.io/arch"],
            },
        }
        # A merge patch replaces the conditions list whole, which is what a heartbeat means.
        self.core.patch_node_status(self.name, {"status": status}, _content_type=MERGE, _request_timeout=TIMEOUT)

    def renew_lease(self) -> None:
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_timestamp()}
        try:
            self.leases.patch_namespaced_lease(self.name, "kube-node-lease", {"spec": spec},
                                               _content_type=MERGE, _request_timeout=TIMEOUT)
        except client.ApiException as exc:
            if not is_not_found(exc):
                raise
            node = call(self.core.read_node, self.name)
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node["metadata"]["uid"]}
            call(self.leases.create_namespaced_lease, "kube-node-lease",
                 {"metadata": {"name": self.name, "ownerReferences": [owner]}, "spec": spec})

    def run(self) -> None:
        """Heartbeat until ``stop``; re-registers when the Node object was deleted."""
        beats = 0
        while not self.stop.wait(HEARTBEAT_SECONDS):
            beats += 1
            try:
                self.renew_lease()
                if beats % STATUS_EVERY_HEARTBEATS == 0:
                    self.post_status()
            except client.ApiException as exc:
                if is_not_found(exc):
                    event("node.missing", "warning", node=self.name)
                    self._reregister()
                else:
                    event("node.heartbeat_failed", "warning", node=self.name, status=exc.status, reason=exc.reason)
            except Exception as exc:  # noqa: BLE001 - keep beating through API server restarts
                event("node.heartbeat_failed", "warning", node=self.name, error=repr(exc))

    def _reregister(self) -> None:
        try:
            self.register()
        except Exception as exc:  # noqa: BLE001
            event("node.register_failed", "warning", node=self.name, error=repr(exc))

    def mark_stopped(self) -> None:
        self._ready_since = timestamp()
        try:
            conditions = self._conditions(False, "KubeletNotReady", "local runtime agent stopped")
            self.core.patch_node_status(self.name, {"status": {"conditions": conditions}},
                                        _content_type=MERGE, _request_timeout=(2, 3))
        except Exception as exc:  # noqa: BLE001 - best effort while shutting down
            event("node.mark_stopped_failed", "warning", node=self.name, error=repr(exc))
