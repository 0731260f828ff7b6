"""Fixtures shared by the suite: the local cluster (``devcluster.pytest_plugin``, loaded in
pyproject.toml), the CRD
installed from ``crds/``, and the operator running as a local process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devcluster.operatorproc import OperatorProcess
from devcluster.pytest_plugin import Cluster, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = REPO_ROOT / "crds" / "llm.vllm-operator.io_llmdeployments.yaml"
# Short, so tests of live status wait seconds rather than minutes.
TEST_SCRAPE_INTERVAL = 2.0


def _established(extensions: client.ApiextensionsV1Api, name: str) -> bool:
    crd = extensions.read_custom_resource_definition(name)
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])


@pytest.fixture(scope="session")
def crd_installed(cluster: Cluster) -> None:
    """The checked-in CRD, applied (server-side, so reruns update it) and Established."""
    manifest = yaml.safe_load(CRD_FILE.read_text())
    name = manifest["metadata"]["name"]
    extensions = client.ApiextensionsV1Api(cluster.api_client)
    try:
        extensions.patch_custom_resource_definition(
            name, manifest, field_manager="vllm-operator-tests", force=True,
            _content_type="application/apply-patch+yaml",
        )
    except ApiException as exc:
        pytest.fail(f"the apiserver refused {CRD_FILE.name}: {exc.status} {exc.body}", pytrace=False)
    wait_for(f"CRD {name} Established", lambda: _established(extensions, name), 30)


@pytest.fixture(scope="module")
def operator(cluster: Cluster, crd_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator watching every namespace for one test module, with a short scrape interval."""
    log_file = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(cluster.kubeconfig, log_file,
                              ["--scrape-interval", str(TEST_SCRAPE_INTERVAL), "--scrape-timeout", "1.5",
                               "--status-min-interval", str(TEST_SCRAPE_INTERVAL)])
    try:
        process.start()
    except RuntimeError as exc:
        pytest.fail(f"{exc}\n{process.log()[-3000:]}", pytrace=False)
    try:
        yield process
    finally:
        process.stop()
