"""Security review as tests: Pod Security levels, the operator image, secret values, and RBAC grants against use.

Pod Security is checked by the real apiserver's PodSecurity admission (a server-side dry-run create of each
rendered Pod template in namespaces that enforce ``restricted`` and ``baseline``), not by reading YAML. The
secret and RBAC checks share one scenario on the local cluster with simulated engines: LLMDeployments that
use an HF token Secret and an API key Secret whose values this test chose, a scale-down, an autoscaler
overrule and a benchmark; afterwards the values are searched for everywhere the operator writes.

RBAC use comes from the operator's own ``vllm_operator_api_writes_total``, its watches and the Events it posted
(the local cluster's apiserver runs without an audit log, and the cluster is shared, so it is not restarted
to add one): a read the operator makes outside its watches would not be seen.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

import llmd
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from test_chart import helm_path, of_kind, render  # noqa: F401 - helm_path is a fixture
from vllm_operator import api
from vllm_operator.api import BENCHMARK_ANNOTATION, BenchmarkRequest, LLMDeploymentSpec
from vllm_operator.benchmark import job as benchmark_job
from vllm_operator.render.manifests import Owner, deployment
from vllm_operator.render.puller import PullerSettings, pull_job

Obj = dict[str, Any]
REPO_ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("restricted", "baseline", "privileged")
OWNER = Owner("sec", "default", "00000000-0000-0000-0000-000000000000")

# -- Pod Security ------------------------------------------------------------------------------------------------

SPECS: dict[str, Obj] = {
    "cpu": {"accelerator": {"type": "cpu"}},
    "cpu-openvino": {"accelerator": {"type": "cpu"}, "engine": {"backend": "openvino"}},
    "nvidia": {"accelerator": {"type": "nvidia", "count": 2}},
    "amd": {"accelerator": {"type": "amd"}},
    "intel-gpu": {"accelerator": {"type": "intel-gpu"}},
    "gaudi": {"accelerator": {"type": "gaudi", "count": 2}},
}
# The strictest level each engine Pod meets, and what keeps it from the next one. restricted needs
# runAsNonRoot, which the upstream vLLM images do not support (they run as root and write under /root);
# Gaudi's runtime needs SYS_NICE, a capability even baseline does not allow.
ENGINE_LEVELS: dict[str, tuple[str, str]] = {
    "cpu": ("baseline", "runAsNonRoot != true"),
    "cpu-openvino": ("baseline", "runAsNonRoot != true"),
    "nvidia": ("baseline", "runAsNonRoot != true"),
    "amd": ("baseline", "runAsNonRoot != true"),
    "intel-gpu": ("baseline", "runAsNonRoot != true"),
    "gaudi": ("privileged", '"SYS_NICE"'),
}


def engine_pod_spec(name: str) -> Obj:
    spec = LLMDeploymentSpec.model_validate({"model": {"name": "org/model"}, **SPECS[name]})
    pod_spec: Obj = deployment(spec, OWNER)["spec"]["template"]["spec"]
    return pod_spec


def puller_pod_spec() -> Obj:
    spec = LLMDeploymentSpec.model_validate({"model": {"name": "org/model"}, "accelerator": {"type": "nvidia"}})
    pod_spec: Obj = pull_job(spec, OWNER, PullerSettings())["spec"]["template"]["spec"]
    return pod_spec


def benchmark_pod_spec() -> Obj:
    spec = LLMDeploymentSpec.model_validate({"model": {"name": "org/model"}, "accelerator": {"type": "nvidia"}})
    pod_spec: Obj = benchmark_job(spec, OWNER, BenchmarkRequest(id="b1"))["spec"]["template"]["spec"]
    return pod_spec


@pytest.fixture(scope="module")
def level_namespaces(cluster: Cluster, crd_installed: None) -> Iterator[dict[str, str]]:
    """A namespace per Pod Security level, enforcing it."""
    core = client.CoreV1Api(cluster.api_client)
    names = {level: f"t-pss-{level}-{uuid.uuid4().hex[:6]}" for level in LEVELS}
    for level, name in names.items():
        core.create_namespace({"metadata": {"name": name, "labels": {
            "vllm-operator.io/test": "true", "pod-security.kubernetes.io/enforce": level,
            "pod-security.kubernetes.io/enforce-version": "latest"}}})
    for name in names.values():
        wait_for(f"ServiceAccount default in {name}",
                 lambda n=name: any(a.metadata.name == "default" for a in core.list_namespaced_service_account(n).items),
                 30)
    yield names
    for name in names.values():
        core.delete_namespace(name)


def admission(cluster: Cluster, namespace: str, pod_spec: Obj) -> str | None:
    """None when PodSecurity admits the Pod in the namespace, else the refusal."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"}, "spec": pod_spec}
    try:
        client.CoreV1Api(cluster.api_client).create_namespaced_pod(namespace, pod, dry_run="All")
    except ApiException as exc:
        assert exc.status == 403, exc.body
        return str(json.loads(exc.body)["message"])
    return None


def strictest_level(cluster: Cluster, namespaces: dict[str, str], pod_spec: Obj) -> tuple[str, dict[str, str]]:
    refusals = {level: refusal for level in LEVELS
                if (refusal := admission(cluster, namespaces[level], pod_spec)) is not None}
    return next(level for level in LEVELS if level not in refusals), refusals


@pytest.mark.cluster
@pytest.mark.parametrize("profile", sorted(SPECS))
def test_engine_pods_meet_their_pod_security_level(cluster: Cluster, level_namespaces: dict[str, str],
                                                   profile: str) -> None:
    level, refusals = strictest_level(cluster, level_namespaces, engine_pod_spec(profile))
    expected, reason = ENGINE_LEVELS[profile]
    assert level == expected, refusals
    stricter = LEVELS[LEVELS.index(level) - 1]
    assert reason in refusals[stricter], refusals[stricter]


def test_model_puller_pods_run_as_the_images_user() -> None:
    uid = int(final_user(REPO_ROOT / "images" / "model-puller" / "Dockerfile").split(":")[0])
    assert puller_pod_spec()["securityContext"]["runAsUser"] == uid


@pytest.mark.cluster
def test_model_puller_pods_are_restricted(cluster: Cluster, level_namespaces: dict[str, str]) -> None:
    level, refusals = strictest_level(cluster, level_namespaces, puller_pod_spec())
    assert level == "restricted", refusals


@pytest.mark.cluster
def test_benchmark_pods_are_baseline(cluster: Cluster, level_namespaces: dict[str, str]) -> None:
    """The benchmark runs vllm bench serve from the engine's (root) image."""
    level, refusals = strictest_level(cluster, level_namespaces, benchmark_pod_spec())
    assert level == "baseline", refusals


# -- the operator's own Pod and images ---------------------------------------------------------------------------

def operator_deployment(helm: Path) -> Obj:
    return next(o for o in render(helm) if o["kind"] == "Deployment")


def final_user(dockerfile: Path) -> str:
    """The USER the image's last stage runs as."""
    last_stage = re.split(r"(?m)^FROM\s", dockerfile.read_text())[-1]
    users = re.findall(r"(?m)^USER\s+(\S+)", last_stage)
    assert users, f"{dockerfile} runs as root: its last stage sets no USER"
    return users[-1]


@pytest.mark.parametrize("image", ["operator", "model-puller"])
def test_images_run_as_a_numeric_non_root_user(image: str) -> None:
    """Numeric, so that the kubelet can verify runAsNonRoot without reading /etc/passwd."""
    uid = final_user(REPO_ROOT / "images" / image / "Dockerfile").split(":")[0]
    assert uid.isdigit() and int(uid) != 0, uid


def test_operator_pod_is_non_root_with_a_read_only_root_filesystem(helm_path: Path) -> None:  # noqa: F811
    pod = operator_deployment(helm_path)["spec"]["template"]["spec"]
    image_uid = int(final_user(REPO_ROOT / "images" / "operator" / "Dockerfile").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        # Whatever it writes goes to an emptyDir; no volume reaches the node.
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        assert all("emptyDir" in v for v in pod.get("volumes", []) if v["name"] in mounted)


@pytest.mark.cluster
def test_operator_pod_is_restricted(cluster: Cluster, level_namespaces: dict[str, str],
                                    helm_path: Path) -> None:  # noqa: F811
    pod_spec = operator_deployment(helm_path)["spec"]["template"]["spec"]
    pod_spec = {**pod_spec, "serviceAccountName": "default"}  # the chart's account is not in the probe namespace
    level, refusals = strictest_level(cluster, level_namespaces, pod_spec)
    assert level == "restricted", refusals


# -- one scenario for secrets and RBAC ---------------------------------------------------------------------------

HF_TOKEN = f"hf_{uuid.uuid4().hex}"
API_KEY = f"sk-{uuid.uuid4().hex}"
SECRETS = {"hf-token": ("token", HF_TOKEN), "api-key": ("key", API_KEY)}
REFS = {"model": {"name": "org/model", "hfTokenSecretRef": {"name": "hf-token", "key": "token"}},
        "apiKeySecretRef": {"name": "api-key", "key": "key"}, "accelerator": {"type": "nvidia"}}


def _spec(**more: Any) -> Obj:
    return {**json.loads(json.dumps(REFS)), **more}


def _manifest(name: str, spec: Obj) -> Obj:
    return {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def _writes(metrics: str) -> set[tuple[str, str]]:
    return {(s.labels["verb"], s.labels["kind"]) for family in text_string_to_metric_families(metrics)
            for s in family.samples
            if s.name == "vllm_operator_api_writes_total" and s.value > 0}


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def scenario(cluster: Cluster, operator: OperatorProcess) -> Iterator[dict[str, Any]]:
    """LLMDeployments that use both Secrets, driven through the operator's main paths; what it left behind."""
    core = client.CoreV1Api(cluster.api_client)
    namespace = f"t-security-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace, "labels": {"vllm-operator.io/test": "true"}}})
    wait_for(f"ServiceAccount default in {namespace}",
             lambda: any(a.metadata.name == "default" for a in core.list_namespaced_service_account(namespace).items), 30)
    for name, (key, value) in SECRETS.items():
        core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "stringData": {key: value}})
    # The cache claim is filled by a download Job with the token; the others' engines download with it.
    llmd.create(cluster.api_client, namespace, _manifest("downloads", _spec()))
    llmd.create(cluster.api_client, namespace, _manifest("serves", _spec(replicas=2, cache={"enabled": False})))
    llmd.create(cluster.api_client, namespace, _manifest("scales", _spec(
        cache={"enabled": False}, autoscaling={"minReplicas": 1, "maxReplicas": 1})))
    policy = client.PolicyV1Api(cluster.api_client)
    # Other sessions' operators on the shared cluster may do some of this work, and count it in their own
    # metrics: what happened to the objects is recorded as well, as evidence of the calls made.
    observed: set[tuple[str, str, str]] = set()
    budget = wait_for("the PodDisruptionBudget", lambda: policy.list_namespaced_pod_disruption_budget(namespace).items, 60)
    if any(f.manager == "vllm-operator" and f.operation == "Apply" for f in budget[0].metadata.managed_fields):
        observed |= {("policy", "poddisruptionbudgets", "create"), ("policy", "poddisruptionbudgets", "patch")}
    llmd.wait_phase(cluster.api_client, namespace, "serves", "Ready", 120)
    llmd.wait_phase(cluster.api_client, namespace, "scales", "Ready", 120)
    # A scale-down removes the disruption budget; a hand-made scale is overruled by the autoscaler.
    llmd.patch_spec(cluster.api_client, namespace, "serves", {"replicas": 1})
    llmd.patch_spec(cluster.api_client, namespace, "scales", {"replicas": 0})
    wait_for("the autoscaler's overrule", lambda: (llmd.get(cluster.api_client, namespace, "scales") or {})
             .get("spec", {}).get("replicas") == 1, 60)
    # A benchmark sends the API key to the engines.
    llmd.patch_metadata(cluster.api_client, namespace, "serves",
                        {"annotations": {BENCHMARK_ANNOTATION: json.dumps({"id": "sec", "numPrompts": 1})}})
    wait_for("the benchmark Job", lambda: ((llmd.get(cluster.api_client, namespace, "serves") or {})
                                           .get("status", {}).get("benchmark") or {}).get("job"), 90)
    observed.add(("batch", "jobs", "create"))  # nothing but the operator makes Jobs here
    wait_for("the PodDisruptionBudget deleted", lambda: not policy.list_namespaced_pod_disruption_budget(namespace)
             .items, 60)
    observed.add(("policy", "poddisruptionbudgets", "delete"))  # its owner lives: the garbage collector keeps it
    yield {"namespace": namespace, "observed": observed}
    core.delete_namespace(namespace)


def _namespace_dump(cluster: Cluster, namespace: str) -> dict[str, str]:
    """Everything readable in the namespace except the Secrets themselves, as JSON per kind."""
    api_client = cluster.api_client
    core, apps, batch = client.CoreV1Api(api_client), client.AppsV1Api(api_client), client.BatchV1Api(api_client)
    lists = {
        "Pod": core.list_namespaced_pod(namespace), "ConfigMap": core.list_namespaced_config_map(namespace),
        "Event": core.list_namespaced_event(namespace), "Service": core.list_namespaced_service(namespace),
        "PersistentVolumeClaim": core.list_namespaced_persistent_volume_claim(namespace),
        "Deployment": apps.list_namespaced_deployment(namespace), "Job": batch.list_namespaced_job(namespace),
        "ReplicaSet": apps.list_namespaced_replica_set(namespace),
    }
    dump = {kind: json.dumps(api_client.sanitize_for_serialization(found)) for kind, found in lists.items()}
    dump["LLMDeployment"] = json.dumps(client.CustomObjectsApi(api_client).list_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL))
    return dump


@pytest.mark.cluster
def test_no_secret_value_leaves_its_secret(cluster: Cluster, operator: OperatorProcess,
                                           scenario: dict[str, Any]) -> None:
    places = {**_namespace_dump(cluster, scenario["namespace"]), "operator log": operator.log(),
              "operator /metrics": _get_text(operator.metrics_url)}
    # The scenario did reach the Secrets: the Pods and Jobs reference them by name.
    assert '"hf-token"' in places["Pod"] and '"api-key"' in places["Pod"] and '"hf-token"' in places["Job"]
    for value in (HF_TOKEN, API_KEY):
        for form in (value, base64.b64encode(value.encode()).decode()):
            leaks = [place for place, text in places.items() if form in text]
            assert not leaks, f"a secret value appears in {leaks}"


# (API group, resource, verb) the chart grants that the scenario does not exercise, and where they are used.
UNEXERCISED: dict[tuple[str, str, str], str] = {
    ("llm.vllm-operator.io", "llmdeployments", "get"): "vllm-operator bench --wait reads one LLMDeployment",
    ("llm.vllm-operator.io", "llmdeployments/finalizers", "update"):
        "never called: the apiserver checks it when a child names its owner with blockOwnerDeletion",
    ("autoscaling", "horizontalpodautoscalers", "list"): "a GET of HPAs, which the write counter does not see",
    ("", "persistentvolumeclaims", "delete"): "a claim created for an LLMDeployment deleted meanwhile",
    ("", "events", "patch"): "a repeated Event counts up on the one already posted",
    ("batch", "jobs", "delete"): "a finished benchmark's Job, once its result is in the status",
    ("", "configmaps", "create"): "a finished benchmark's report (apply)",
    ("", "configmaps", "patch"): "a finished benchmark's report (apply)",
    ("", "pods/log", "get"): "a starting real engine's log (status.startup); test_engine_e2e sees the stage",
}
# Write counter kinds -> (API group, resource).
KINDS = {
    "Deployment": ("apps", "deployments"), "Service": ("", "services"),
    "PersistentVolumeClaim": ("", "persistentvolumeclaims"), "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
    "Job": ("batch", "jobs"), "ConfigMap": ("", "configmaps"),
    "LLMDeployment/status": (api.GROUP, "llmdeployments/status"),
    "LLMDeployment/scale": (api.GROUP, "llmdeployments/scale"),
}


def granted_rules(helm: Path) -> set[tuple[str, str, str]]:
    role = next(r for r in of_kind(render(helm), "ClusterRole"))
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def used_rules(metrics: str, events: list[Obj]) -> set[tuple[str, str, str]]:
    """What the operator did: its watches (list and watch, and get of the same objects), its counted writes
    (a server-side apply is a patch that needs create when it makes the object), and the Events it posted."""
    used: set[tuple[str, str, str]] = set()
    for handler in kopf.get_default_registry()._watching.get_all_handlers():
        resource = (handler.selector.group or "", handler.selector.any_name)
        used |= {(*resource, "list"), (*resource, "watch")}
    for verb, kind in _writes(metrics):
        group, resource = KINDS[kind]
        verbs = {"patch"} | ({"create"} if "/" not in resource else set()) if verb == "apply" else {verb}
        used |= {(group, resource, v) for v in verbs}
    if events:
        used.add(("", "events", "create"))
    if any((e.get("count") or 1) > 1 for e in events):
        used.add(("", "events", "patch"))
    return used


@pytest.mark.cluster
def test_rbac_grants_what_the_operator_uses(cluster: Cluster, operator: OperatorProcess, scenario: dict[str, Any],
                                           helm_path: Path) -> None:  # noqa: F811
    metrics = _get_text(operator.metrics_url)
    import vllm_operator.handlers  # noqa: F401 - registers the watches
    events = [e for e in client.CoreV1Api(cluster.api_client).list_namespaced_event(scenario["namespace"]).to_dict()
              ["items"] if (e.get("reporting_component") or (e.get("source") or {}).get("component") or "")
              .startswith("vllm-operator")]
    granted = granted_rules(helm_path)
    used = used_rules(metrics, events) | scenario["observed"]
    assert used - granted == set(), "the operator does what the chart does not allow"
    reads = {(group, resource, "get") for group, resource, verb in granted if verb == "list"}
    unexplained = granted - used - reads - set(UNEXERCISED)
    assert unexplained == set(), f"granted, never used: remove it from the chart or exercise it here; " \
        f"writes counted: {sorted(_writes(metrics))}"
