"""The chart's monitoring objects, rendered by helm, and what they mean to a plain Prometheus.

``render`` turns on the PodMonitor, ServiceMonitor, PrometheusRule and dashboard ConfigMap and returns the
rendered objects. ``prometheus_config`` writes the scrape jobs a Prometheus Operator would generate from the
PodMonitor (Kubernetes Pod discovery, the same keep and target-label relabelling, then the PodMonitor's own
relabelings) and, for an operator that runs as a local process, a static job with the labels the
ServiceMonitor's would carry. The demo runs Prometheus with that configuration and the chart's alert rules.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from devcluster.cluster import REPO_ROOT

Obj = dict[str, Any]

CHART = REPO_ROOT / "charts" / "vllm-operator"
DASHBOARD = CHART / "dashboards" / "vllm-operator.json"
ENABLE_ALL = ("podMonitor.enabled=true", "serviceMonitor.enabled=true", "prometheus.rules.enabled=true",
              "grafana.dashboards.enabled=true")


class MonitoringError(RuntimeError):
    """helm or Prometheus refused; the message says which and why."""


def render(helm: Path, release: str, namespace: str, *settings: str) -> list[Obj]:
    """The chart's objects with every monitoring object enabled (``settings`` are more ``--set`` pairs)."""
    flags = [flag for setting in (*ENABLE_ALL, *settings) for flag in ("--set", setting)]
    result = subprocess.run([str(helm), "template", release, str(CHART), "--namespace", namespace, *flags],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise MonitoringError(f"helm template failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    if len(found) != 1:
        raise MonitoringError(f"expected one {kind} in the rendered chart, found {len(found)}")
    return found[0]


def rule_file(objects: list[Obj]) -> Obj:
    """The PrometheusRule's groups as a Prometheus rule file."""
    return {"groups": one(objects, "PrometheusRule")["spec"]["groups"]}


def dashboard(objects: list[Obj]) -> Obj:
    """The Grafana dashboard the ConfigMap carries."""
    [text] = one(objects, "ConfigMap")["data"].values()
    parsed: Obj = json.loads(text)
    return parsed


def panels(dashboard: Obj) -> Iterator[Obj]:
    """Every panel of a Grafana dashboard, rows and the panels of collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _label_name(kubernetes_label: str) -> str:
    # Kubernetes discovery writes a label's name with every character Prometheus does not allow as "_".
    return re.sub(r"[^a-zA-Z0-9_]", "_", kubernetes_label)


def _snake(relabeling: Obj) -> Obj:
    """A Prometheus Operator RelabelConfig (camelCase) in Prometheus' own spelling."""
    return {re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower(): value for key, value in relabeling.items()}


def pod_monitor_jobs(monitor: Obj, kubeconfig: Path) -> list[Obj]:
    """The scrape jobs a Prometheus Operator generates from ``monitor``, one per endpoint."""
    meta, spec = monitor["metadata"], monitor["spec"]
    discovery: Obj = {"role": "pod", "kubeconfig_file": str(kubeconfig)}
    namespaces = spec.get("namespaceSelector") or {}
    if not namespaces.get("any"):
        discovery["namespaces"] = {"names": namespaces.get("matchNames") or [meta["namespace"]]}
    selected = [{"action": "keep", "regex": f"({value});true",
                 "source_labels": [f"__meta_kubernetes_pod_label_{_label_name(key)}",
                                   f"__meta_kubernetes_pod_labelpresent_{_label_name(key)}"]}
                for key, value in spec["selector"]["matchLabels"].items()]
    jobs = []
    for index, endpoint in enumerate(spec["podMetricsEndpoints"]):
        relabel = [
            {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
            *selected,
            {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
             "regex": endpoint["port"]},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
            *(_snake(r) for r in endpoint.get("relabelings", [])),
        ]
        job: Obj = {"job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/{index}",
                    "honor_labels": endpoint.get("honorLabels", False),
                    "metrics_path": endpoint.get("path", "/metrics"),
                    "kubernetes_sd_configs": [discovery], "relabel_configs": relabel}
        if endpoint.get("interval"):
            job["scrape_interval"] = endpoint["interval"]
        jobs.append(job)
    return jobs


def service_monitor_job(monitor: Obj, service: Obj, address: str) -> Obj:
    """The ServiceMonitor's job for a target that is no Pod (a local process): the labels it would carry."""
    meta = monitor["metadata"]
    [endpoint] = monitor["spec"]["endpoints"]
    labels = {"job": service["metadata"]["name"], "namespace": service["metadata"]["namespace"],
              "service": service["metadata"]["name"], "endpoint": endpoint["port"]}
    return {"job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/0",
            "honor_labels": endpoint.get("honorLabels", False), "metrics_path": endpoint.get("path", "/metrics"),
            "static_configs": [{"targets": [address], "labels": labels}]}


def prometheus_config(objects: list[Obj], kubeconfig: Path, operator_address: str, interval: float,
                      rule_path: Path) -> Obj:
    """A Prometheus configuration scraping what the chart's monitors select, evaluating its alert rules."""
    service = next(o for o in objects if o["kind"] == "Service" and "http-metrics" in
                   {p["name"] for p in o["spec"]["ports"]})
    return {
        "global": {"scrape_interval": f"{interval:g}s", "evaluation_interval": f"{interval:g}s"},
        "rule_files": [str(rule_path)],
        "scrape_configs": [*pod_monitor_jobs(one(objects, "PodMonitor"), kubeconfig),
                           service_monitor_job(one(objects, "ServiceMonitor"), service, operator_address)],
    }


def _api(base_url: str, path: str, params: dict[str, str], timeout: float) -> Any:
    """The ``data`` of a Prometheus HTTP API answer."""
    with urllib.request.urlopen(f"{base_url}/api/v1/{path}?{urllib.parse.urlencode(params)}",
                                timeout=timeout) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise MonitoringError(f"Prometheus refused {path} {params}: {body.get('error')}")
    return body["data"]


def query(base_url: str, expr: str, at: float | None = None, timeout: float = 10.0) -> list[Obj]:
    """An instant query's result vector (``metric`` labels and ``value``), now or ``at`` a Unix time."""
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    result: list[Obj] = _api(base_url, "query", params, timeout)["result"]
    return result


def query_range(base_url: str, expr: str, start: float, end: float, step: float, timeout: float = 30.0) -> list[Obj]:
    """A range query's result matrix (``metric`` labels and ``values``)."""
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    result: list[Obj] = _api(base_url, "query_range", params, timeout)["result"]
    return result


def rules(base_url: str) -> list[Obj]:
    """The rule groups Prometheus evaluates, with each rule's health and state."""
    groups: list[Obj] = _api(base_url, "rules", {}, 10.0)["groups"]
    return groups
