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

from devcluster.engine import model_snapshot
from devcluster.hub import LocalHub, default_repos, folder_repo, write_synthetic
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


BIG_REPO = "local/big"
MIB = 1024 * 1024
BIG_SIZE = 25 * MIB + 123  # more than two of the client's 10 MiB download chunks


@pytest.fixture
def private_hub(tmp_path: Path) -> Iterator[LocalHub]:
    """A hub of one test's own (counters and faults of its own): the default repos and ``BIG_REPO``."""
    folder = write_synthetic(tmp_path / "repos", BIG_REPO, {"model_type": "llama", "torch_dtype": "bfloat16"},
                             {"model.safetensors": BIG_SIZE})
    with LocalHub([*default_repos(model_snapshot()), folder_repo(BIG_REPO, folder)]).serve() as running:
        yield running


@pytest.fixture
def tiny() -> Path:
    """The generated tiny model's snapshot folder."""
    snapshot = model_snapshot()
    if snapshot is None:
        pytest.skip("the tiny model is not generated; run `make model`")
    return snapshot


@pytest.fixture(scope="session")
def hub() -> Iterator[LocalHub]:
    """The local Hugging Face hub: the tiny model and repos that describe real ones (tests/data/hub)."""
    with LocalHub(default_repos(model_snapshot())).serve() as running:
        yield running


@pytest.fixture(scope="module")
def operator(cluster: Cluster, crd_installed: None, hub: LocalHub,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator watching every namespace for one test module, with a short scrape interval, asking the
    local hub about models."""
    log_file = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(cluster.kubeconfig, log_file,
                              ["--scrape-interval", str(TEST_SCRAPE_INTERVAL), "--scrape-timeout", "1.5",
                               "--status-min-interval", str(TEST_SCRAPE_INTERVAL)], env=hub.env())
    try:
        process.start()
    except RuntimeError as exc:
        pytest.fail(f"{exc}\n{process.log()[-3000:]}", pytrace=False)
    try:
        yield process
    finally:
        process.stop()
