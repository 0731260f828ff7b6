"""The operator's own kubeconfig, in-cluster and exec-plugin loading, quantity and RFC 3339 parsing,
and that the operator runs without the ``kubernetes`` package (kubeconfig.py says why). Quantities and
times are checked against the ``kubernetes`` package's own parsers, which stay installed for tests."""

from __future__ import annotations

import ast
import base64
import json
import re
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.config.dateutil import parse_rfc3339 as library_rfc3339
from kubernetes.utils import parse_quantity as library_quantity

import llmd
from devcluster.hub import LocalHub
from devcluster.operatorproc import WITHOUT_KUBERNETES, as_in_image, free_port, operator_env, wait_healthy
from devcluster.pytest_plugin import Cluster, wait_for
from vllm_operator import api, handlers, kubeconfig
from vllm_operator.kubeconfig import ConfigError, parse_quantity, parse_rfc3339
from vllm_operator.kube import Credentials, Kube

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "operator" / "vllm_operator"
LOCAL_CLUSTER = ROOT / ".local-cluster"


# -- no kubernetes package --------------------------------------------------------------------------


def test_no_operator_module_imports_the_kubernetes_package() -> None:
    """Imports inside functions too (the ``bench`` command's were), which importing the modules misses."""
    importing = []
    for source in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            importing += [f"{source.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] == "kubernetes"]
    assert importing == []


def test_every_operator_module_imports_without_the_kubernetes_package() -> None:
    script = WITHOUT_KUBERNETES + (
        "import pkgutil, vllm_operator\n"
        "for module in pkgutil.walk_packages(vllm_operator.__path__, 'vllm_operator.'):\n"
        "    __import__(module.name)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_kubernetes_is_a_dev_dependency_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = re.compile(r"[A-Za-z0-9_.-]+")
    assert "kubernetes" not in {name.match(d)[0] for d in project["dependencies"]}  # type: ignore[index]
    assert "kubernetes" in {name.match(d)[0] for d in project["optional-dependencies"]["dev"]}  # type: ignore[index]


# -- quantities -------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantity", [
    "0", "1", "-1", "+1", "1.5", ".5", "5.", "100m", "1n", "250u", "2k", "3M", "4G", "5T", "6P", "7E",
    "1Ki", "1Mi", "1.5Gi", "2Ti", "3Pi", "4Ei", "1e3", "1E3", "1.5e-3", "2e+2", "12345678901234567890123456789Ei",
    "0.000000001n", "-0.5Mi",
])
def test_quantities_have_the_kubernetes_packages_values(quantity: str) -> None:
    assert parse_quantity(quantity) == library_quantity(quantity)


def test_numbers_are_quantities_of_their_own_value() -> None:
    assert [parse_quantity(v) for v in (3, 2.5, Decimal("0.1"))] == [Decimal(3), Decimal(2.5), Decimal("0.1")]


@pytest.mark.parametrize("text", ["", "Gi", "1Gb", "1ki", "1K", "1mi", "1 Gi", " 1", "1e", "1.2.3", "inf", "NaN",
                                  "1_000", "0x10", "1Gi\n", "e3"])
def test_what_is_no_kubernetes_quantity_is_refused(text: str) -> None:
    # Some of these the kubernetes package reads ("1K", "inf", "1_000"); the apiserver refuses them all.
    assert re.fullmatch(api.QUANTITY_PATTERN, text) is None
    with pytest.raises(ValueError):
        parse_quantity(text)


def outcome(parse: Any, text: str) -> Decimal | type[ValueError]:
    try:
        return parse(text)  # type: ignore[no-any-return]
    except ValueError:
        return ValueError


@settings(max_examples=500, deadline=None)
@given(st.from_regex(api.QUANTITY_PATTERN, fullmatch=True))
def test_generated_quantities_have_the_kubernetes_packages_values(quantity: str) -> None:
    # The OpenAPI pattern lets through fractional exponents ("1e.5"); both parsers refuse them.
    assert outcome(parse_quantity, quantity) == outcome(library_quantity, quantity)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789.+-eEnumkKMGTPi ", max_size=8))
def test_any_text_is_refused_or_read_as_the_kubernetes_package_does(text: str) -> None:
    if re.fullmatch(api.QUANTITY_PATTERN, text) is None:
        with pytest.raises(ValueError):
            parse_quantity(text)
    else:
        assert outcome(parse_quantity, text) == outcome(library_quantity, text)


# -- RFC 3339 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["2026-12-01T18:30:00Z", "2026-12-01t18:30:00z", "2026-12-01T18:30:00.5Z",
                                  "2026-12-01T18:30:00.123456789Z", "2026-12-01T20:30:00+02:00",
                                  "2026-12-01T10:30:00.25-08:00"])
def test_rfc3339_times_are_read_as_the_kubernetes_package_reads_them(text: str) -> None:
    assert parse_rfc3339(text) == library_rfc3339(text)


def test_a_time_without_a_zone_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_rfc3339("2026-12-01T18:30:00")


# -- kubeconfig files -------------------------------------------------------------------------------


def write_kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any], *, name: str = "c",
                     current: str | None = "c", namespace: str | None = None) -> Path:
    context: dict[str, Any] = {"cluster": name, "user": name, **({"namespace": namespace} if namespace else {})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", **({"current-context": current} if current else {}),
        "clusters": [{"name": name, "cluster": cluster}], "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": context}],
    }))
    return path


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


SERVER = {"server": "https://127.0.0.1:6443"}


def test_a_token_and_the_contexts_namespace(tmp_path: Path) -> None:
    access = kubeconfig.from_kubeconfig(str(write_kubeconfig(tmp_path / "k", SERVER, {"token": "abc"}, namespace="ai")))
    assert (access.server, access.namespace, access.token and access.token.value()) == (SERVER["server"], "ai", "abc")
    assert access.expires is None


def test_a_token_file_is_read_again_once_it_changes(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("first\n")
    access = kubeconfig.from_kubeconfig(str(write_kubeconfig(tmp_path / "k", SERVER, {"tokenFile": "token"})))
    assert access.token is not None and access.token.value() == "first"  # relative to the kubeconfig
    (tmp_path / "token.new").write_text("second")
    (tmp_path / "token.new").replace(tmp_path / "token")  # as the kubelet swaps it
    assert access.token.value() == "second"


def test_a_named_context_and_merged_files_first_one_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_kubeconfig(tmp_path / "a", SERVER, {"token": "a"}, name="a", current="a")
    second = write_kubeconfig(tmp_path / "b", {"server": "https://b:6443"}, {"token": "b"}, name="b", current="b")
    shadowed = write_kubeconfig(tmp_path / "c", {"server": "https://shadowed:6443"}, {"token": "c"}, name="a",
                                current=None)
    monkeypatch.setenv("KUBECONFIG", ":".join(map(str, (first, tmp_path / "missing", second, shadowed))))
    assert kubeconfig.from_kubeconfig().server == SERVER["server"]
    assert kubeconfig.from_kubeconfig(context="b").server == "https://b:6443"
    with pytest.raises(ConfigError, match="'d'"):
        kubeconfig.from_kubeconfig(context="d")


@pytest.mark.parametrize(("user", "refused"), [
    ({"username": "u", "password": "p"}, "username"),
    ({"auth-provider": {"name": "oidc", "config": {}}}, "auth-provider"),
    ({"exec": {"apiVersion": "client.authentication.k8s.io/v1alpha1", "command": "x"}}, "v1alpha1"),
    ({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "x", "interactiveMode": "Always"}},
     "terminal"),
    ({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "/no/such/plugin",
               "installHint": "install it"}}, "install it"),
])
def test_what_is_unsupported_says_so(tmp_path: Path, user: dict[str, Any], refused: str) -> None:
    with pytest.raises(ConfigError, match=refused):
        kubeconfig.from_kubeconfig(str(write_kubeconfig(tmp_path / "k", SERVER, user)))


def test_no_current_context_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no current-context"):
        kubeconfig.from_kubeconfig(str(write_kubeconfig(tmp_path / "k", SERVER, {"token": "t"}, current=None)))


EXEC_PLUGIN = """#!/bin/sh
# Says what it was given: its arguments, an env entry and client-go's KUBERNETES_EXEC_INFO.
printf '%s' "$KUBERNETES_EXEC_INFO" > "$1"
printf '{"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
 "status": {"token": "%s-%s", "expirationTimestamp": "2030-01-02T03:04:05Z"}}' "$2" "$GREETING"
"""


def test_an_exec_plugin_gives_a_token_and_its_expiry(tmp_path: Path) -> None:
    plugin = tmp_path / "bin" / "plugin"
    plugin.parent.mkdir()
    plugin.write_text(EXEC_PLUGIN)
    plugin.chmod(0o755)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "bin/plugin",
                     "args": [str(tmp_path / "info"), "token"], "env": [{"name": "GREETING", "value": "hi"}],
                     "provideClusterInfo": True}}
    access = kubeconfig.from_kubeconfig(str(write_kubeconfig(tmp_path / "k", SERVER, user)))
    assert access.token is not None and access.token.value() == "token-hi"
    assert access.expires == datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    info = json.loads((tmp_path / "info").read_text())
    assert info["spec"] == {"interactive": False, "cluster": SERVER}
    assert Credentials.of(access).expires == access.expires.timestamp()


def test_an_exec_expiry_in_the_past_means_expired_credentials() -> None:
    access = kubeconfig.Access("https://x", expires=datetime.now(timezone.utc) - timedelta(seconds=1))
    assert Credentials.of(access).expired(datetime.now(timezone.utc).timestamp())


def test_a_failing_exec_plugin_says_what_it_wrote(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin"
    plugin.write_text("#!/bin/sh\necho 'not logged in' >&2\nexit 3\n")
    plugin.chmod(0o755)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
                     "interactiveMode": "Never"}}
    with pytest.raises(ConfigError, match=r"failed \(3\): not logged in"):
        kubeconfig.from_kubeconfig(str(write_kubeconfig(tmp_path / "k", SERVER, user)))


def local_cluster_kubeconfigs() -> list[Path]:
    return sorted([LOCAL_CLUSTER / "kubeconfig", *(LOCAL_CLUSTER / "config").glob("*.kubeconfig")])


@pytest.mark.skipif(not (LOCAL_CLUSTER / "kubeconfig").exists(), reason="no local cluster configured")
def test_the_local_clusters_kubeconfigs_load_as_the_kubernetes_package_loads_them() -> None:
    from kubernetes import client
    from kubernetes.config import kube_config

    for path in local_cluster_kubeconfigs():
        access = kubeconfig.from_kubeconfig(str(path))
        library = client.Configuration()
        kube_config.load_kube_config(str(path), client_configuration=library)
        assert access.server == library.host
        assert access.ca_data == Path(library.ssl_ca_cert).read_text()
        assert access.cert_data == Path(library.cert_file).read_text()
        assert access.key_data == Path(library.key_file).read_text()
        assert access.ssl_context().verify_mode == ssl.CERT_REQUIRED


def test_certificates_as_files_and_as_data_make_the_same_tls_identity(tmp_path: Path) -> None:
    from devcluster.certs import Authority

    authority = Authority(tmp_path / "pki")
    pair = authority.server("client", "client", ("127.0.0.1",))
    as_files = kubeconfig.from_kubeconfig(str(write_kubeconfig(
        tmp_path / "files", {**SERVER, "certificate-authority": str(authority.pair.cert)},
        {"client-certificate": str(pair.cert), "client-key": str(pair.key)})))
    as_data = kubeconfig.from_kubeconfig(str(write_kubeconfig(
        tmp_path / "data", {**SERVER, "certificate-authority-data": b64(authority.pair.cert)},
        {"client-certificate-data": b64(pair.cert), "client-key-data": b64(pair.key)})))
    assert (as_files.cert_file, as_files.key_file) == (str(pair.cert), str(pair.key))
    assert as_data.cert_data == pair.cert.read_text() and as_data.ca_data == authority.pair.cert.read_text()
    # Each loads the key pair (a mismatch or bad PEM raises) and trusts the one CA named, not the system's.
    trusted = [access.ssl_context().get_ca_certs() for access in (as_files, as_data)]
    assert len(trusted[0]) == 1 and trusted[0] == trusted[1]


def test_insecure_skip_tls_verify_verifies_nothing(tmp_path: Path) -> None:
    access = kubeconfig.from_kubeconfig(str(write_kubeconfig(
        tmp_path / "k", {**SERVER, "insecure-skip-tls-verify": True}, {"token": "t"})))
    context = access.ssl_context()
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_NONE, False)


def test_kopf_logs_in_with_the_operators_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_kubeconfig(tmp_path / "k", {**SERVER, "insecure-skip-tls-verify": True}, {"token": "abc"},
                            namespace="ai")
    monkeypatch.setattr(handlers.OPTIONS, "kubeconfig", str(path))
    info = handlers.login()
    assert (info.server, info.token, info.insecure, info.default_namespace) == (SERVER["server"], "abc", True, "ai")
    assert info.as_http_headers() == {"Authorization": "Bearer abc"}


# -- against the local cluster ----------------------------------------------------------------------


@pytest.mark.cluster
def test_certificate_files_with_relative_paths_reach_the_apiserver(cluster: Cluster, tmp_path: Path) -> None:
    import asyncio

    certs = LOCAL_CLUSTER / "certs"
    server = kubeconfig.from_kubeconfig(str(cluster.kubeconfig)).server
    (tmp_path / "pki").symlink_to(certs)
    path = write_kubeconfig(tmp_path / "k", {"server": server, "certificate-authority": "pki/ca.crt"},
                            {"client-certificate": "pki/admin.crt", "client-key": "pki/admin.key"})

    async def body() -> dict[str, Any]:
        kube = Kube(Credentials.load(str(path)))
        try:
            return await kube.request("GET", "/version")
        finally:
            await kube.close()

    assert asyncio.run(body())["major"] == "1"


@pytest.mark.cluster
def test_the_operator_reconciles_without_the_kubernetes_package(
    cluster: Cluster, crd_installed: None, hub: LocalHub, namespace: str, tmp_path: Path,
) -> None:
    """kopf's watches log in through the operator's own handler: kopf's fallbacks need the package."""
    health, metrics = free_port(), free_port()
    log_file = tmp_path / "operator.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            as_in_image("run", "--kubeconfig", str(cluster.kubeconfig), "-n", namespace,
                        "--metrics-port", str(metrics), "--health-port", str(health)),
            # Only --kubeconfig says where the cluster is: kopf's own fallback reads $KUBECONFIG.
            stdout=log, stderr=subprocess.STDOUT, env=operator_env({**hub.env(), "KUBECONFIG": str(tmp_path / "none")}))
    try:
        wait_healthy(process, health, log_file)
        manifest = llmd.example("llama3-8b-h100")  # on a simulated node: nothing runs
        manifest["spec"].setdefault("cache", {})["size"] = "1Gi"
        llmd.create(cluster.api_client, namespace, manifest)

        def reconciled() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
                text = response.read().decode()
            return bool(re.search(r'^vllm_operator_reconcile_total\{result="[^"]+"\} [1-9]', text, re.M))

        wait_for("a reconcile by the operator without kubernetes", reconciled, timeout=60)
        assert "Initial authentication has finished" in log_file.read_text()
    finally:
        process.terminate()
        process.wait(15)
    assert "ModuleNotFoundError" not in log_file.read_text() and "ImportError" not in log_file.read_text()
