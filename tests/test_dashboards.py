"""The chart's Grafana dashboard: shipped as a ConfigMap for Grafana's sidecar when enabled, every query
reading only metrics that real vLLM 0.32 and the operator export, every query valid PromQL, and grouped by
labels the chart's PodMonitor really gives engine series."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import llmd
from devcluster import binaries, monitoring
from devcluster.monitoring import panels
from promql import known_names, metric_names, unknown_names
from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.render.manifests import SELECTOR_LABEL, Owner, deployment

Obj = dict[str, Any]
DASHBOARD_FILE = monitoring.DASHBOARD


@pytest.fixture(scope="module")
def helm_path() -> Path:
    binaries.ensure((binaries.HELM,))
    return binaries.path_of("helm")


@pytest.fixture(scope="module")
def rendered(helm_path: Path) -> list[Obj]:
    return monitoring.render(helm_path, "vllm-operator", "monitoring")


def queries(dashboard: Obj) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs = [t["expr"] for panel in panels(dashboard) for t in panel.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_the_configmap_carries_the_dashboard_and_the_sidecar_label(helm_path: Path, rendered: list[Obj]) -> None:
    configmap = monitoring.one(rendered, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert monitoring.dashboard(rendered) == json.loads(DASHBOARD_FILE.read_text())
    moved = monitoring.render(helm_path, "vllm-operator", "monitoring", "grafana.dashboards.namespace=grafana",
                              "grafana.dashboards.label=dashboards", "grafana.dashboards.labelValue=vllm")
    assert monitoring.one(moved, "ConfigMap")["metadata"]["namespace"] == "grafana"
    assert monitoring.one(moved, "ConfigMap")["metadata"]["labels"]["dashboards"] == "vllm"
    flags = [flag for setting in monitoring.ENABLE_ALL for flag in ("--set", setting)]
    linted = subprocess.run([str(helm_path), "lint", "--strict", str(monitoring.CHART), *flags],
                            capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    plain = subprocess.run([str(helm_path), "template", "vllm-operator", str(monitoring.CHART)],
                           capture_output=True, text=True, check=True).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(plain) if doc}
    assert not kinds & {"ConfigMap", "PrometheusRule"}, "monitoring objects are rendered only when enabled"


def test_the_dashboard_shows_each_llmdeployment_and_replica() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "llmdeployment"} <= variables
    read = {name for expr in queries(dashboard) for name in metric_names(expr)}
    wanted = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
              "vllm:inter_token_latency_seconds_bucket", "vllm:request_success_total", "up",
              "vllm_operator_llmdeployment_phase", "vllm_operator_leader"}
    assert wanted <= read, wanted - read
    engine_queries = [e for e in queries(dashboard) if "vllm:" in e]
    assert all('namespace=~"$namespace"' in e and 'llmdeployment=~"$llmdeployment"' in e for e in engine_queries)


def test_every_query_reads_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert unknown_names(queries(dashboard), known_names()) == {}


def test_a_query_of_a_metric_that_does_not_exist_is_caught() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    broken = copy.deepcopy(dashboard)
    target = next(t for p in panels(broken) for t in p.get("targets", []) if "vllm:num_requests_running" in t["expr"])
    target["expr"] = target["expr"].replace("vllm:num_requests_running", "vllm:num_requests_runing")
    assert list(unknown_names(queries(broken), known_names()).values()) == [{"vllm:num_requests_runing"}]


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (namespace, pod) (rate(vllm:prompt_tokens_total{namespace=~"$namespace"}[$__rate_interval]))',
     {"vllm:prompt_tokens_total"}),
    ('histogram_quantile(0.95, sum by (le) (rate(a_bucket{le!="+Inf"}[5m] offset 1h))) > 2.5e3', {"a_bucket"}),
    ("max(vllm_operator_leader) < 1 or absent(vllm_operator_leader)", {"vllm_operator_leader"}),
    ('a / on (pod) group_left (node) b unless {__name__="c", x="and"}', {"a", "b", "c"}),
    ('label_values(vllm_operator_llmdeployment_phase{namespace=~"$namespace"}, llmdeployment)',
     {"vllm_operator_llmdeployment_phase"}),
])
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, with Grafana's variables as Grafana would fill them in."""
    binaries.ensure((binaries.PROMETHEUS,))
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = [t["expr"] for panel in panels(dashboard) for t in panel.get("targets", [])]
    filled = [re.sub(r"\$__rate_interval", "1m", re.sub(r"\$(namespace|llmdeployment)\b", ".+", e)) for e in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e}
                                                        for i, e in enumerate(filled)]}]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    result = subprocess.run([str(binaries.path_of("promtool")), "check", "rules", str(tmp_path / "queries.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_the_labels_grouped_by_come_from_the_pod_monitor(rendered: list[Obj]) -> None:
    """``llmdeployment`` is relabelled from the label the operator puts on every engine Pod."""
    monitor = monitoring.one(rendered, "PodMonitor")
    [job] = monitoring.pod_monitor_jobs(monitor, Path("kubeconfig"))
    copied = {r["target_label"]: r.get("source_labels") for r in job["relabel_configs"] if "target_label" in r}
    assert copied["llmdeployment"] == [f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', SELECTOR_LABEL)}"]
    assert copied["namespace"] == ["__meta_kubernetes_namespace"] and copied["pod"] == ["__meta_kubernetes_pod_name"]
    example = llmd.example("llama3-8b-h100")
    engine = deployment(LLMDeploymentSpec.model_validate(example["spec"]), Owner("llama", "team-a", "uid-1"))
    assert engine["spec"]["template"]["metadata"]["labels"][SELECTOR_LABEL] == "llama"
