"""Security review as tests: Pod Security levels, the operator image, secret values, and RBAC grants against use.

Pod Security is checked by the real apiserver's PodSecurity admission (a server-side dry-run create of each
rendered Pod template in namespaces that enforce ``restricted`` and ``baseline``), not by reading YAML. The
secret check runs one scenario on the local cluster with simulated engines: LLMDeployments that use an HF token
Secret and an API key Secret whose values this test chose, a scale-down, an autoscaler overrule and a benchmark;
afterwards the values are searched for everywhere the operator writes.

RBAC is held to the apiserver's audit log (the local cluster writes one, ``devcluster.audit``): every call the
operator and the gateway made in the whole test session (they run as users of their own) must be granted by the
chart's ClusterRoles, and after the whole suite every grant must have been used, or be explained.
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

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import llmd
from devcluster import audit
from devcluster.cluster import GATEWAY, OPERATOR
from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for
from test_chart import DATA, helm_path, of_kind, render  # noqa: F401 - helm_path is a fixture
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
    wait_for("the PodDisruptionBudget", lambda: policy.list_namespaced_pod_disruption_budget(namespace).items, 60)
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
    wait_for("the PodDisruptionBudget deleted", lambda: not policy.list_namespaced_pod_disruption_budget(namespace)
             .items, 60)
    yield {"namespace": namespace}
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


# (API group, resource, verb) the chart grants that no test makes the operator call, and why it is granted.
UNEXERCISED: dict[tuple[str, str, str], str] = {
    ("llm.vllm-operator.io", "llmdeployments/finalizers", "update"):
        "never called: the apiserver checks it when a child names its owner with blockOwnerDeletion",
    ("", "persistentvolumeclaims", "delete"): "a claim created for an LLMDeployment deleted while it was created",
}


def granted_rules(helm: Path, gateway: bool) -> set[tuple[str, str, str]]:
    """What the chart's ClusterRole of the operator (or of the gateway) grants, watching every namespace."""
    objects = render(helm, *([DATA / "values-gateway.yaml"] if gateway else []))
    role = next(r for r in of_kind(objects, "ClusterRole") if r["metadata"]["name"].endswith("-gateway") == gateway)
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def needed(calls: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    """The RBAC verbs ``calls`` need: a server-side apply is a patch, which needs create where it makes the object."""
    return calls | {(group, resource, "create") for group, resource, verb in calls
                    if verb == "patch" and "/" not in resource}


def whole_suite(request: pytest.FixtureRequest) -> bool:
    return request.config.args_source == pytest.Config.ArgsSource.TESTPATHS and not request.config.option.keyword \
        and not request.config.option.markexpr


@pytest.mark.cluster
@pytest.mark.last
@pytest.mark.parametrize(("user", "gateway"), [(OPERATOR.user, False), (GATEWAY.user, True)],
                         ids=["operator", "gateway"])
def test_rbac_grants_what_is_called_and_nothing_else(cluster: Cluster, helm_path: Path,  # noqa: F811
                                                       request: pytest.FixtureRequest, user: str,
                                                       gateway: bool) -> None:
    """Every call of the operator (or the gateway) in the apiserver's audit log, over the whole test session, is
    granted by the chart; and, after the whole suite, every grant was used or is explained."""
    calls = audit.calls(cluster.kubeconfig.parent, user)
    if not calls:
        pytest.skip(f"the audit log holds no call of {user} (a cluster started without audit logging?)")
    granted = granted_rules(helm_path, gateway)
    assert needed(calls) - granted == set(), "called, but the chart does not allow it"
    if whole_suite(request):
        unused = granted - needed(calls) - set(UNEXERCISED)
        assert unused == set(), "granted, never called in the whole suite: remove it from the chart or explain it"
