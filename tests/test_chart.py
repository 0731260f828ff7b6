"""The Helm chart: lint, render, schema and least-privilege RBAC; on the local cluster, an operator
that runs with nothing but the chart's ServiceAccount, and helm upgrade and uninstall."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

import llmd
import vllm_operator
from devcluster import binaries
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from devcluster.serviceaccount import service_account_kubeconfig
from vllm_operator import api
from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.render.manifests import Owner, cache_claim_name, deployment

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "vllm-operator"
DATA = REPO / "tests" / "data" / "chart"
EVERYTHING = DATA / "values-everything.yaml"
HELM_TIMEOUT = 120
# How the apiserver words an RBAC denial of the chart's ServiceAccount (JSON logs escape the quotes).
RBAC_DENIAL = re.compile(r"system:serviceaccount:\S+ cannot \w+ resource")

Obj = dict[str, Any]

# What the operator may do, rule by rule; any widening of the chart must change this table.
RULES: list[Obj] = [
    {"apiGroups": ["llm.vllm-operator.io"], "resources": ["llmdeployments"], "verbs": ["list", "watch"]},
    {"apiGroups": ["llm.vllm-operator.io"], "resources": ["llmdeployments/status"], "verbs": ["patch"]},
    {"apiGroups": ["llm.vllm-operator.io"], "resources": ["llmdeployments/scale"], "verbs": ["patch"]},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": ["list"]},
    {"apiGroups": ["llm.vllm-operator.io"], "resources": ["llmdeployments/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["apps"], "resources": ["deployments"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["leaderworkerset.x-k8s.io"], "resources": ["leaderworkersets"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list", "watch"]},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
]


# What the gateway may do: read LLMDeployments and engine Pods, wake LLMDeployments, read API key Secrets.
GATEWAY_RULES: list[Obj] = [
    {"apiGroups": ["llm.vllm-operator.io"], "resources": ["llmdeployments"], "verbs": ["list", "watch"]},
    {"apiGroups": ["llm.vllm-operator.io"], "resources": ["llmdeployments/scale"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
]


def lease_rules(name: str) -> list[Obj]:
    """Leader election among replicas: create any Lease (RBAC cannot name it), read and renew only its own."""
    return [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [name],
         "verbs": ["get", "update"]},
    ]


@pytest.fixture(scope="session")
def helm_path() -> Path:
    binaries.ensure((binaries.HELM,))
    return binaries.path_of("helm")


def helm(helm_path: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(helm_path), *map(str, args)], capture_output=True, text=True, timeout=HELM_TIMEOUT)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(map(str, args))} failed:\n{result.stdout}{result.stderr}")
    return result


def render(helm_path: Path, *values: Path, namespace: str = "ops") -> list[Obj]:
    flags = [flag for path in values for flag in ("-f", path)]
    out = helm(helm_path, "template", "vllm-operator", CHART, "--namespace", namespace, *flags).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def values_file(tmp_path: Path, name: str, values: Obj) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    """Objects of ``kind``; ClusterRoles for users (aggregated into edit and view) are apart: see user_roles."""
    return [o for o in objects if o["kind"] == kind and not user_role(o)]


def user_role(obj: Obj) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return obj["kind"] == "ClusterRole" and any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in labels)


def user_roles(objects: list[Obj]) -> dict[str, Obj]:
    return {label.rsplit("-", 1)[-1]: o for o in objects if user_role(o)
            for label in o["metadata"]["labels"] if label.startswith("rbac.authorization.k8s.io/aggregate-to-")}


def one(objects: list[Obj], kind: str) -> Obj:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# -- chart metadata and values ------------------------------------------------------------------


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    package = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["apiVersion"] == "v2" and chart["name"] == "vllm-operator"
    assert chart["appVersion"] == package == vllm_operator.__version__


def test_every_value_is_commented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*[\w.-]+:", line):
            above = lines[number - 1].strip() if number else ""
            assert "#" in line or above.startswith("#"), f"values.yaml line {number + 1} has no comment: {line!r}"


def _closed_objects(schema: Obj, path: str) -> Iterator[tuple[str, Obj]]:
    if "properties" in schema:
        yield path, schema
        for name, prop in schema["properties"].items():
            yield from _closed_objects(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _closed_objects(schema["items"], f"{path}[]")


def test_schema_rejects_unknown_keys_at_every_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    checked = [schema, *schema["definitions"].values()]
    objects = [node for s in checked for _, node in _closed_objects(s, "")]
    assert len(objects) > 5
    for node in objects:
        assert node.get("additionalProperties") is False, node
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) == set(schema["properties"])


@pytest.mark.parametrize("values", [None, EVERYTHING], ids=["defaults", "everything"])
def test_lint_and_template_pass(helm_path: Path, values: Path | None) -> None:
    flags = ["-f", values] if values else []
    helm(helm_path, "lint", "--strict", CHART, *flags)
    objects = render(helm_path, *([values] if values else []))
    assert {o["kind"] for o in objects} >= {"ServiceAccount", "Service"}


@pytest.mark.parametrize(("file", "named"), [
    ("values-typo.yaml", "additional properties 'replicaCont' not allowed"),
    ("values-wrong-type.yaml", "at '/watchNamespaces': got number, want array"),
])
def test_mistaken_values_are_rejected_naming_the_key(helm_path: Path, file: str, named: str) -> None:
    for command in (["lint", CHART], ["template", "vllm-operator", CHART]):
        result = helm(helm_path, *command, "-f", DATA / file, check=False)
        assert result.returncode != 0, f"helm {command[0]} accepted {file}"
        assert named in result.stdout + result.stderr


# -- RBAC ---------------------------------------------------------------------------------------


def test_cluster_wide_rbac_is_exactly_the_table(helm_path: Path) -> None:
    objects = render(helm_path)
    role = one(objects, "ClusterRole")
    assert role["rules"] == RULES
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    account = one(objects, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "ops"}]
    assert not of_kind(objects, "Role") and not of_kind(objects, "RoleBinding")


def test_users_with_edit_manage_llmdeployments_and_viewers_read_them(helm_path: Path, tmp_path: Path) -> None:
    roles = user_roles(render(helm_path))
    assert set(roles) == {"admin", "edit", "view"}
    edit = {verb for rule in roles["edit"]["rules"] if "llmdeployments" in rule["resources"] for verb in rule["verbs"]}
    assert {"create", "patch", "delete"} <= edit
    assert {v for rule in roles["view"]["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}
    off = render(helm_path, values_file(tmp_path, "v.yaml", {"rbac": {"aggregateToDefaultRoles": False}}))
    assert not user_roles(off)


def test_watched_namespaces_get_roles_and_nothing_cluster_wide(helm_path: Path, tmp_path: Path) -> None:
    objects = render(helm_path, values_file(tmp_path, "v.yaml", {"watchNamespaces": ["team-a", "team-b"]}))
    roles = of_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == RULES for r in roles)
    bindings = of_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["subjects"][0]["namespace"] == "ops" for b in bindings)
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]


@pytest.mark.parametrize("namespaces", [[], ["ops", "team-a"]], ids=["cluster-wide", "namespaced"])
def test_replicas_add_only_a_lease_role_in_the_release_namespace(
    helm_path: Path, tmp_path: Path, namespaces: list[str]
) -> None:
    objects = render(helm_path, values_file(tmp_path, "v.yaml", {"replicaCount": 2, "watchNamespaces": namespaces}))
    election = "vllm-operator-leader-election"
    roles = [r for r in of_kind(objects, "Role") + of_kind(objects, "ClusterRole") if r["metadata"]["name"] != election]
    assert len(roles) == max(1, len(namespaces)) and all(r["rules"] == RULES for r in roles)
    lease_role = next(r for r in of_kind(objects, "Role") if r["metadata"]["name"] == election)
    assert lease_role["metadata"]["namespace"] == "ops"
    assert lease_role["rules"] == lease_rules("vllm-operator")
    binding = next(b for b in of_kind(objects, "RoleBinding") if b["metadata"]["name"] == election)
    assert binding["metadata"]["namespace"] == "ops"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": election}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "vllm-operator", "namespace": "ops"}]


def gateway_objects(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "gateway"]


@pytest.mark.parametrize("namespaces", [[], ["team-a", "team-b"]], ids=["cluster-wide", "namespaced"])
def test_the_gateway_is_off_by_default_and_on_has_its_own_narrow_rbac(
    helm_path: Path, tmp_path: Path, namespaces: list[str]
) -> None:
    assert not gateway_objects(render(helm_path))
    objects = gateway_objects(render(helm_path, values_file(tmp_path, "v.yaml", {
        "gateway": {"enabled": True, "wakeTimeout": 120}, "watchNamespaces": namespaces})))
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    assert account == "vllm-operator-gateway"
    kind = "Role" if namespaces else "ClusterRole"
    roles = of_kind(objects, kind)
    assert sorted(r["metadata"].get("namespace", "") for r in roles) == (namespaces or [""])
    assert all(r["rules"] == GATEWAY_RULES for r in roles)
    for binding in of_kind(objects, f"{kind}Binding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "ops"}]
    workload = one(objects, "Deployment")
    pod = workload["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    args = pod["containers"][0]["args"]
    assert args[0] == "gateway" and "--wake-timeout=120" in args
    assert [a for a in args if a.startswith("--namespace")] == [f"--namespace={n}" for n in namespaces]
    service = one(objects, "Service")
    assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
    operator = one([o for o in render(helm_path) if o["kind"] == "Deployment"], "Deployment")
    assert service["spec"]["selector"] != operator["spec"]["selector"]["matchLabels"], "never the operator's Pods"


# -- the operator's workload ---------------------------------------------------------------------


def test_default_operator_is_one_hardened_standalone_deployment(helm_path: Path) -> None:
    objects = render(helm_path)
    workload = one(objects, "Deployment")
    assert workload["spec"]["strategy"] == {"type": "Recreate"}
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    container = pod["containers"][0]
    assert container["image"] == "vllm-operator:0.1.0"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["command"] == ["vllm-operator"]
    assert container["args"] == ["run", "--log-format=json", "--log-level=info", "--metrics-port=8080",
                                 "--health-port=8081", "--scrape-interval=15", "--scrape-timeout=5", "--workers=32",
                                 "--status-min-interval=30", "--status-writes-per-second=100",
                                 "--model-puller-image=vllm-model-puller:2.4.0", "--kube-api-qps=500",
                                 "--kube-api-burst=1000"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    assert container["env"] == [{"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"][0]["name"] == "tmp" and "emptyDir" in pod["volumes"][0]
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "http-metrics", "port": 8080, "targetPort": "http-metrics",
                                         "protocol": "TCP"}]
    assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
    for absent in ("Role", "PodDisruptionBudget", "ServiceMonitor", "PodMonitor"):
        assert not of_kind(objects, absent), absent


def test_every_option_lands_where_it_belongs(helm_path: Path) -> None:
    objects = render(helm_path, EVERYTHING)
    labels = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
              "app.kubernetes.io/component", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by"}
    for obj in objects:
        assert labels <= set(obj["metadata"]["labels"]), obj["kind"]
    workload = one(objects, "Deployment")
    assert workload["spec"]["strategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][-3:] == ["--leader-elect", "--leader-election-namespace=$(POD_NAMESPACE)",
                                      "--leader-election-id=llm-operator-everything"]
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert fields == {"POD_ID": "metadata.name", "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    lease_role = next(r for r in of_kind(objects, "Role") if r["metadata"]["namespace"] == "ops")
    assert lease_role["metadata"]["name"] == "llm-operator-everything-leader-election"
    assert lease_role["rules"] == lease_rules("llm-operator-everything")
    assert "--scrape-interval=2.5" in container["args"] and "--log-level=debug" in container["args"]
    assert {"--kube-api-qps=50.5", "--kube-api-burst=100", "--status-min-interval=20",
            "--status-writes-per-second=40",
            "--model-puller-image=registry.example.com/vllm-model-puller:2.4.0"} <= set(container["args"])
    assert container["image"] == "registry.example.com/vllm-operator:0.1.0-test"
    assert pod["priorityClassName"] == "ml-platform-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"} and pod["tolerations"] and pod["affinity"]
    assert workload["spec"]["template"]["metadata"]["labels"]["team"] == "ml-platform"
    assert one(objects, "ServiceAccount")["metadata"]["annotations"] == {"iam.example.com/role": "llm-operator"}
    budget = one(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"] == workload["spec"]["selector"]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http-metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == one(objects, "Service")["spec"]["selector"]
    assert one(objects, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_pod_monitor_selects_the_engine_pods_the_operator_builds(helm_path: Path) -> None:
    monitor = one(render(helm_path, EVERYTHING), "PodMonitor")["spec"]
    example = llmd.example("llama3-8b-h100")
    engine = deployment(LLMDeploymentSpec.model_validate(example["spec"]), Owner("llama", "team-a", "uid-1"))
    template = engine["spec"]["template"]
    assert monitor["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert monitor["podMetricsEndpoints"][0]["port"] in ports
    assert monitor["podMetricsEndpoints"][0]["path"] == "/metrics"


# -- on the local cluster -----------------------------------------------------------------------


def by_name(name: str) -> str:
    """A field selector for one object, so an absent one is an empty list rather than a 404."""
    return f"metadata.name={name}"


def may_patch_disruption_budgets(cluster: Cluster, namespace: str, account: str) -> bool:
    review = client.AuthorizationV1Api(cluster.api_client).create_subject_access_review({
        "spec": {"user": f"system:serviceaccount:{namespace}:{account}", "resourceAttributes": {
            "group": "policy", "resource": "poddisruptionbudgets", "verb": "patch", "namespace": namespace}}})
    return bool(review.status.allowed)


def small_on_gpus(name: str, replicas: int) -> Obj:
    """The H100 example, renamed, with a small cache that replicas on several nodes can share."""
    manifest = llmd.example("llama3-8b-h100")
    manifest["metadata"]["name"] = name
    manifest["spec"]["cache"].update(size="1Gi", accessMode="ReadWriteMany")
    manifest["spec"]["replicas"] = replicas
    return manifest


def wait_ready(process: OperatorProcess, namespace: str, name: str, cluster: Cluster) -> Obj:
    try:
        return llmd.wait_phase(cluster.api_client, namespace, name, "Ready", 90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{process.log()[-3000:]}") from None


def started_operator(kubeconfig: Path, log_file: Path, scope: list[str]) -> OperatorProcess:
    process = OperatorProcess(kubeconfig, log_file, [*scope, "--scrape-interval", "2", "--scrape-timeout", "1.5"])
    try:
        return process.start()
    except RuntimeError as exc:
        pytest.fail(f"{exc}\n{process.log()[-3000:]}", pytrace=False)


# The operator runs as a local process under the chart's ServiceAccount, not in a Pod.
NO_POD = {"replicaCount": 0}


def helm_in(helm_path: Path, cluster: Cluster, namespace: str, *args: str | Path) -> None:
    helm(helm_path, *args, "--namespace", namespace, "--kubeconfig", cluster.kubeconfig)


def install(helm_path: Path, cluster: Cluster, namespace: str, release: str, values: Path, tmp_path: Path) -> Path:
    """Install the chart; a kubeconfig of the release's ServiceAccount, with a bound token."""
    helm_in(helm_path, cluster, namespace, "install", release, CHART, "-f", values)
    return service_account_kubeconfig(cluster.api_client, cluster.kubeconfig, namespace, release,
                                      tmp_path / "kubeconfig")


@pytest.fixture
def release(helm_path: Path, cluster: Cluster, namespace: str) -> Iterator[str]:
    """A release name in the test namespace, uninstalled afterwards (it may hold cluster-wide RBAC)."""
    name = f"vllm-operator-{namespace[-6:]}"
    yield name
    helm_in(helm_path, cluster, namespace, "uninstall", name, "--ignore-not-found", "--wait")


@pytest.mark.cluster
def test_namespaced_install_serves_with_only_its_own_rbac(
    helm_path: Path, cluster: Cluster, namespace: str, release: str, tmp_path: Path
) -> None:
    values = values_file(tmp_path, "values.yaml", {**NO_POD, "watchNamespaces": [namespace]})
    kubeconfig = install(helm_path, cluster, namespace, release, values, tmp_path)
    assert client.ApiextensionsV1Api(cluster.api_client).read_custom_resource_definition(f"{api.PLURAL}.{api.GROUP}")
    rbac = client.RbacAuthorizationV1Api(cluster.api_client)
    role = rbac.read_namespaced_role(release, namespace)
    assert not rbac.list_cluster_role(field_selector=by_name(release)).items

    process = started_operator(kubeconfig, tmp_path / "operator.log", ["-n", namespace])
    try:
        llmd.create(cluster.api_client, namespace, small_on_gpus("served", replicas=2))
        ready = wait_ready(process, namespace, "served", cluster)
        assert ready["status"]["ready"] == "2/2"
        core, apps = client.CoreV1Api(cluster.api_client), client.AppsV1Api(cluster.api_client)
        assert apps.read_namespaced_deployment("served", namespace)
        assert core.read_namespaced_service("served", namespace)
        assert core.read_namespaced_persistent_volume_claim(cache_claim_name("served"), namespace)
        assert client.PolicyV1Api(cluster.api_client).read_namespaced_pod_disruption_budget("served", namespace)
        assert not RBAC_DENIAL.findall(process.log()), process.log()[-3000:]

        # Take away writing disruption budgets: a new LLMDeployment must say so, not fail silently.
        assert may_patch_disruption_budgets(cluster, namespace, release)
        for rule in role.rules:
            if "poddisruptionbudgets" in rule.resources:
                rule.verbs = ["get", "list", "watch"]
        rbac.replace_namespaced_role(release, namespace, role)
        wait_for("the apiserver to deny patching disruption budgets",
                 lambda: not may_patch_disruption_budgets(cluster, namespace, release), 10)
        llmd.create(cluster.api_client, namespace, small_on_gpus("refused", replicas=2))
        refused = wait_for("the refused disruption budget in the status", lambda: (
            (obj := llmd.get(cluster.api_client, namespace, "refused"))
            and (llmd.condition(obj, "Degraded") or {}).get("reason") == "ApplyFailed" and obj), 60)
        message = llmd.condition(refused, "Degraded")["message"]
        assert "PodDisruptionBudget refused" in message and "forbidden" in message, message
        llmd.events_once(cluster.api_client, namespace, "refused", lambda events: any(
            e.type == "Warning" and e.reason == "ApplyFailed" for e in events))
        assert process.process is not None and process.process.poll() is None, "the operator exited"
        assert llmd.get(cluster.api_client, namespace, "served")["status"]["phase"] == "Ready"
    finally:
        process.stop()


# The operator's lease duration: how long a standby waits for a leader that died without releasing.
LEASE_SECONDS = 15


def scraped(process: OperatorProcess, name: str) -> float | None:
    """One of the operator's own metrics, summed over its labels; None when it has no sample yet."""
    with urllib.request.urlopen(process.metrics_url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((f"{name} ", f"{name}{{"))]
    return sum(values) if values else None


def lease_holder(cluster: Cluster, namespace: str, name: str) -> str:
    lease = client.CoordinationV1Api(cluster.api_client).read_namespaced_lease(name, namespace)
    return lease.spec.holder_identity or ""


def identity(process: OperatorProcess) -> str:
    """The identity a local replica takes without POD_NAME: host name and process id."""
    assert process.process is not None
    return f"{socket.gethostname()}_{process.process.pid}"


def leading(replicas: list[OperatorProcess]) -> list[OperatorProcess]:
    alive = [r for r in replicas if r.process is not None and r.process.poll() is None]
    return [r for r in alive if scraped(r, "vllm_operator_leader") == 1]


@pytest.mark.cluster
def test_replicas_elect_one_leader_with_the_charts_rbac(
    helm_path: Path, cluster: Cluster, namespace: str, release: str, tmp_path: Path
) -> None:
    # Replicas played by local processes; the Deployment's own Pods are kept off every node.
    values = values_file(tmp_path, "values.yaml", {
        "replicaCount": 2, "watchNamespaces": [namespace], "nodeSelector": {"vllm-operator.io/test": "nowhere"}})
    kubeconfig = install(helm_path, cluster, namespace, release, values, tmp_path)
    election = ["-n", namespace, "--leader-elect", "--leader-election-namespace", namespace,
                "--leader-election-id", release]
    replicas = [started_operator(kubeconfig, tmp_path / f"replica-{index}.log", election) for index in (0, 1)]

    def holder_is(process: OperatorProcess) -> bool:
        return lease_holder(cluster, namespace, release) == identity(process)

    try:
        leader = wait_for("a leader", lambda: leading(replicas), 30)[0]
        standby = next(r for r in replicas if r is not leader)
        assert holder_is(leader) and leading(replicas) == [leader]

        llmd.create(cluster.api_client, namespace, small_on_gpus("ha", replicas=1))
        wait_ready(leader, namespace, "ha", cluster)
        llmd.patch_spec(cluster.api_client, namespace, "ha", {"replicas": 2})
        generation = wait_ready(leader, namespace, "ha", cluster)["metadata"]["generation"]
        # Several scrape intervals: the standby writes nothing, so the status never goes back.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            status = (llmd.get(cluster.api_client, namespace, "ha") or {}).get("status") or {}
            assert status.get("observedGeneration") == generation, status
            time.sleep(0.3)
        assert scraped(standby, "vllm_operator_leader") == 0
        assert scraped(standby, "vllm_operator_api_writes_total") is None
        assert scraped(standby, "vllm_operator_reconcile_total") is None

        # A clean stop releases the Lease, so the standby takes over without waiting for it to expire.
        leader.stop()
        started = time.monotonic()
        wait_for("the standby to take the released lease", lambda: holder_is(standby), LEASE_SECONDS)
        assert time.monotonic() - started < LEASE_SECONDS / 2
        llmd.patch_spec(cluster.api_client, namespace, "ha", {"replicas": 1})
        wait_ready(standby, namespace, "ha", cluster)

        # A leader that dies keeps the Lease until it expires on the other replica's clock.
        replicas.append(started_operator(kubeconfig, tmp_path / "replica-2.log", election))
        assert standby.process is not None
        os.killpg(standby.process.pid, signal.SIGKILL)
        standby.process.wait()
        assert lease_holder(cluster, namespace, release) == identity(standby)
        wait_for("the new replica to take the expired lease", lambda: holder_is(replicas[2]), LEASE_SECONDS + 15)
        llmd.patch_spec(cluster.api_client, namespace, "ha", {"replicas": 2})
        wait_ready(replicas[2], namespace, "ha", cluster)
        for replica in replicas:
            assert not RBAC_DENIAL.findall(replica.log()), replica.log()[-3000:]
    finally:
        for replica in replicas:
            replica.stop()


@pytest.mark.cluster
def test_cluster_wide_install_upgrade_and_uninstall_keep_user_objects(
    helm_path: Path, cluster: Cluster, namespace: str, release: str, tmp_path: Path
) -> None:
    values = values_file(tmp_path, "values.yaml", NO_POD)
    kubeconfig = install(helm_path, cluster, namespace, release, values, tmp_path)
    rbac = client.RbacAuthorizationV1Api(cluster.api_client)
    assert rbac.read_cluster_role(release) and rbac.read_cluster_role_binding(release)
    apps = client.AppsV1Api(cluster.api_client)
    before = apps.read_namespaced_deployment(release, namespace)

    process = started_operator(kubeconfig, tmp_path / "operator.log", [])
    try:
        llmd.create(cluster.api_client, namespace, small_on_gpus("kept", replicas=1))
        wait_ready(process, namespace, "kept", cluster)
        assert not RBAC_DENIAL.findall(process.log()), process.log()[-3000:]
    finally:
        process.stop()

    helm_in(helm_path, cluster, namespace, "upgrade", release, CHART, "-f", values,
            "--set", "logLevel=debug", "--set", "scrapeInterval=30")
    after = apps.read_namespaced_deployment(release, namespace)
    assert after.metadata.generation > before.metadata.generation
    args = after.spec.template.spec.containers[0].args
    assert "--log-level=debug" in args and "--scrape-interval=30" in args

    helm_in(helm_path, cluster, namespace, "uninstall", release, "--wait")
    assert not rbac.list_cluster_role(field_selector=by_name(release)).items
    assert not apps.list_namespaced_deployment(namespace, field_selector=by_name(release)).items
    assert llmd.get(cluster.api_client, namespace, "kept") is not None
    core = client.CoreV1Api(cluster.api_client)
    assert core.read_namespaced_persistent_volume_claim(cache_claim_name("kept"), namespace)
    assert client.ApiextensionsV1Api(cluster.api_client).read_custom_resource_definition(f"{api.PLURAL}.{api.GROUP}")
