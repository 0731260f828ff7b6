"""Simulated nodes (played by kwok), the kwok configuration, and the default StorageClass."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devcluster.binaries import KUBERNETES_VERSION, KWOK_VERSION

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
SIMULATED_LABEL = "node-role.vllm-operator.io/simulated"
# Loopback, so the simulated engines can listen on every Pod IP kwok hands out.
POD_CIDR = "127.64.0.0/16"  # kwok takes the first half, the local-runtime node the last /24
STORAGE_CLASS = "local-path"
PROVISIONER = "vllm-operator.io/local-path"
TIMEOUT = (5, 30)  # connect, read: a wedged API server must not hang `up`

Obj = dict[str, Any]


@dataclass(frozen=True)
class SimulatedNode:
    name: str
    address: str
    extended: dict[str, str] = field(default_factory=dict)  # extended resources, e.g. nvidia.com/gpu
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[tuple[str, str], ...] = ()  # (key, value), all NoSchedule

    def manifest(self) -> Obj:
        resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti", **self.extended}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "annotations": {KWOK_ANNOTATION: "fake"},
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    SIMULATED_LABEL: "true",
                    **self.labels,
                },
            },
            "spec": {"taints": [{"key": k, "value": v, "effect": "NoSchedule"} for k, v in self.taints]},
            "status": {
                "capacity": resources,
                "allocatable": resources,
                # Addresses nothing listens on: pods on simulated nodes never run.
                "addresses": [{"type": "InternalIP", "address": self.address},
                              {"type": "Hostname", "address": self.name}],
                "nodeInfo": {
                    "architecture": "amd64", "operatingSystem": "linux", "osImage": "kwok",
                    "kubeletVersion": KUBERNETES_VERSION, "kubeProxyVersion": KUBERNETES_VERSION,
                    "containerRuntimeVersion": f"kwok://{KWOK_VERSION}", "kernelVersion": KWOK_VERSION,
                    "machineID": "", "systemUUID": "", "bootID": "",
                },
            },
        }


H100_PRODUCT = "NVIDIA-H100-80GB-HBM3"
INTEL_GPU_PRODUCT = "Max_1550"
NODES = (
    *(SimulatedNode(f"gpu-h100-{i}", f"127.0.20.{10 + i}", {"nvidia.com/gpu": "8"},
                    {"nvidia.com/gpu.product": H100_PRODUCT, "nvidia.com/gpu.count": "8"},
                    (("nvidia.com/gpu", "present"),)) for i in range(3)),
    # Two of each, so that a replica across two nodes (a LeaderWorkerSet group of 2 x 8) can be placed.
    *(SimulatedNode(f"gaudi-{i}", f"127.0.20.{20 + i}", {"habana.ai/gaudi": "8"}, {"habana.ai/gaudi": "true"},
                    (("habana.ai/gaudi", "present"),)) for i in range(2)),
    # Intel's GPU device plugin advertises gpu.intel.com/i915; its NFD rules add the product and presence labels.
    SimulatedNode("intel-gpu-0", "127.0.20.40", {"gpu.intel.com/i915": "4"},
                  {"gpu.intel.com/product": INTEL_GPU_PRODUCT, "intel.feature.node.kubernetes.io/gpu": "true"},
                  (("gpu.intel.com/i915", "present"),)),
    SimulatedNode("cpu-0", "127.0.20.30"),
)


def ensure_nodes(api: client.ApiClient) -> None:
    """Create the simulated nodes, or bring existing ones back to their declared shape."""
    core = client.CoreV1Api(api)
    for node in NODES:
        body = node.manifest()
        try:
            core.create_node(body, _request_timeout=TIMEOUT)
            continue
        except ApiException as exc:
            if exc.status != 409:
                raise
        core.patch_node(node.name, {"metadata": body["metadata"], "spec": body["spec"]}, _request_timeout=TIMEOUT)
        core.patch_node_status(node.name, {"status": {k: body["status"][k] for k in ("capacity", "allocatable")}},
                               _request_timeout=TIMEOUT)


def ensure_storage_class(api: client.ApiClient) -> None:
    body = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS,
                     "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": PROVISIONER,
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Delete",
    }
    try:
        client.StorageV1Api(api).create_storage_class(body, _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status != 409:  # provisioner and binding mode are immutable: keep what exists
            raise


def release_leases(api: client.ApiClient) -> None:
    """Delete the simulated nodes' Leases: a new kwok only takes over a node once the Lease of
    the previous kwok has expired (40 s), and pods on it stay Pending until then."""
    coordination = client.CoordinationV1Api(api)
    for node in NODES:
        try:
            coordination.delete_namespaced_lease(node.name, "kube-node-lease", _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise


def renewed_leases(api: client.ApiClient, since: datetime) -> set[str]:
    """Nodes whose Lease was renewed at or after ``since`` (tz-aware)."""
    renewed = set()
    for lease in client.CoordinationV1Api(api).list_namespaced_lease("kube-node-lease", _request_timeout=TIMEOUT).items:
        if lease.metadata and lease.metadata.name and lease.spec and lease.spec.renew_time and \
                lease.spec.renew_time >= since:
            renewed.add(lease.metadata.name)
    return renewed


def schedulable_nodes(api: client.ApiClient, names: list[str]) -> set[str]:
    """The subset of ``names`` that is Ready and no longer carries the node controller's
    not-ready taint (it lags the Ready condition by a few seconds)."""
    found = set()
    for node in client.CoreV1Api(api).list_node(_request_timeout=TIMEOUT).items:
        name = node.metadata.name if node.metadata else None
        conditions = (node.status.conditions if node.status else None) or []
        taints = (node.spec.taints if node.spec else None) or []
        if (name in names
                and any(c.type == "Ready" and c.status == "True" for c in conditions)
                and not any(t.key == "node.kubernetes.io/not-ready" for t in taints)):
            found.add(name)
    return found


# kwok plays kubelet for nodes annotated kwok.x-k8s.io/node=fake: it keeps them Ready (it renews
# their Leases; the status heartbeat below can be slow), makes their pods Running and Ready, completes
# Job pods, and removes pods once they are being deleted. Status templates are strategic-merge
# patches, so fields set at node creation (capacity, addresses, nodeInfo) are kept.
_CONDITIONS = """\
      {{ $now := Now }}
      conditions:
      {{ range $type, $status := dict "Ready" "True" "MemoryPressure" "False" "DiskPressure" "False"
           "PIDPressure" "False" "NetworkUnavailable" "False" }}
      - type: {{ $type }}
        status: {{ $status | Quote }}
        reason: {{ if eq $type "Ready" }}KubeletReady{{ else }}KubeletHasNo{{ $type }}{{ end }}
        message: simulated by kwok
        lastHeartbeatTime: {{ $now | Quote }}
        lastTransitionTime: {{ or $.metadata.creationTimestamp $now | Quote }}
      {{ end }}
"""


def kwok_stages(heartbeat_ms: int = 60000) -> str:
    return f"""\
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-ready
spec:
  resourceRef: {{apiGroup: v1, kind: Node}}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: NotIn
      values: ['True']
  next:
    statusTemplate: |
{_CONDITIONS}      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-heartbeat
spec:
  resourceRef: {{apiGroup: v1, kind: Node}}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: In
      values: ['True']
  delay:
    durationMilliseconds: {heartbeat_ms}
    jitterDurationMilliseconds: {heartbeat_ms + heartbeat_ms // 10}
  next:
    statusTemplate: |
{_CONDITIONS}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef: {{apiGroup: v1, kind: Pod}}
  selector:
    matchExpressions:
    - key: .metadata.deletionTimestamp
      operator: DoesNotExist
    - key: .status.phase
      operator: In
      values: [Pending]
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      phase: Running
      startTime: {{{{ $now | Quote }}}}
      conditions:
      {{{{ range list "PodReadyToStartContainers" "Initialized" "ContainersReady" "Ready" }}}}
      - type: {{{{ . }}}}
        status: "True"
        lastTransitionTime: {{{{ $now | Quote }}}}
      {{{{ end }}}}
      {{{{ range .spec.readinessGates }}}}
      - type: {{{{ .conditionType | Quote }}}}
        status: "True"
        lastTransitionTime: {{{{ $now | Quote }}}}
      {{{{ end }}}}
      containerStatuses:
      {{{{ range .spec.containers }}}}
      - name: {{{{ .name | Quote }}}}
        image: {{{{ .image | Quote }}}}
        imageID: ""
        ready: true
        started: true
        restartCount: 0
        state:
          running:
            startedAt: {{{{ $now | Quote }}}}
      {{{{ end }}}}
      initContainerStatuses:
      {{{{ range .spec.initContainers }}}}
      - name: {{{{ .name | Quote }}}}
        image: {{{{ .image | Quote }}}}
        imageID: ""
        ready: true
        restartCount: 0
        state:
          terminated:
            exitCode: 0
            reason: Completed
            startedAt: {{{{ $now | Quote }}}}
            finishedAt: {{{{ $now | Quote }}}}
      {{{{ end }}}}
      {{{{ with NodeIPsWith .spec.nodeName }}}}
      hostIP: {{{{ index . 0 | Quote }}}}
      hostIPs:
      {{{{ range . }}}}
      - ip: {{{{ . | Quote }}}}
      {{{{ end }}}}
      {{{{ end }}}}
      {{{{ with PodIPsWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" )
           ( or .metadata.name "" ) ( or .metadata.namespace "" ) }}}}
      podIP: {{{{ index . 0 | Quote }}}}
      podIPs:
      {{{{ range . }}}}
      - ip: {{{{ . | Quote }}}}
      {{{{ end }}}}
      {{{{ end }}}}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: job-pod-complete
spec:
  resourceRef: {{apiGroup: v1, kind: Pod}}
  selector:
    matchExpressions:
    - key: .metadata.deletionTimestamp
      operator: DoesNotExist
    - key: .status.phase
      operator: In
      values: [Running]
    - key: .metadata.ownerReferences.[].kind
      operator: In
      values: [Job]
  next:
    statusTemplate: |
      {{{{ $now := Now }}}}
      phase: Succeeded
      conditions:
      - type: Ready
        status: "False"
        reason: PodCompleted
        lastTransitionTime: {{{{ $now | Quote }}}}
      containerStatuses:
      {{{{ range .spec.containers }}}}
      - name: {{{{ .name | Quote }}}}
        image: {{{{ .image | Quote }}}}
        ready: false
        started: false
        restartCount: 0
        state:
          terminated:
            exitCode: 0
            reason: Completed
            startedAt: {{{{ $now | Quote }}}}
            finishedAt: {{{{ $now | Quote }}}}
      {{{{ end }}}}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef: {{apiGroup: v1, kind: Pod}}
  selector:
    matchExpressions:
    - key: .metadata.deletionTimestamp
      operator: Exists
  next:
    delete: true
"""
