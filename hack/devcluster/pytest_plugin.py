"""pytest fixtures for the local cluster: ``cluster`` (session) and ``namespace`` (per test).

``cluster`` reuses the cluster ``KUBECONFIG`` points at when it answers; otherwise it brings up
the local cluster with the same code as ``python -m devcluster up`` and stops it at the end of
the session, but only when this session started it.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from devcluster.cluster import ClusterError, LocalCluster

TIMEOUT = (5, 30)  # connect, read
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.3,
             explain: Callable[[], str] | None = None) -> T:
    """Poll ``probe`` until it returns something truthy, which is returned; AssertionError on timeout, with
    what ``explain`` says of the state then (so a failure in CI can be understood from its log alone)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                                 + (f"\n{explain()}" if explain is not None else ""))
        time.sleep(interval)


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    api_client: client.ApiClient
    started_here: bool


def _reachable(kubeconfig: Path) -> client.ApiClient | None:
    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))
    except Exception:  # noqa: BLE001 - an unreadable kubeconfig is not a usable cluster
        return None
    try:
        client.VersionApi(api).get_code(_request_timeout=(3, 5))
    except Exception:  # noqa: BLE001 - neither is one that does not answer
        api.close()
        return None
    return api


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    def report(line: str) -> None:
        print(f"[local cluster] {line}", flush=True)

    configured = Path(os.environ.get("KUBECONFIG", ""))
    api = _reachable(configured) if configured.is_file() else None
    if api is not None:
        with api:
            yield Cluster(configured.resolve(), api, started_here=False)
        return
    local = LocalCluster()
    try:
        started = local.up(report)
    except ClusterError as exc:
        pytest.fail(f"cannot start the local cluster: {exc}", pytrace=False)
    try:
        with local.api_client() as api:
            yield Cluster(local.kubeconfig, api, started_here=started)
    finally:
        if started:
            local.down(report)


def _has_default_service_account(core: client.CoreV1Api, namespace: str) -> bool:
    try:
        core.read_namespaced_service_account("default", namespace, _request_timeout=TIMEOUT)
    except ApiException as exc:
        if exc.status != 404:
            raise
        return False
    return True


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test; deleted afterwards without waiting for it to go."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")
    name = f"t-{stem}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(cluster.api_client)
    core.create_namespace({"metadata": {"name": name, "labels": {"vllm-operator.io/test": "true"}}},
                          _request_timeout=TIMEOUT)
    try:
        # Pods are rejected until the service-account controller has created `default`.
        wait_for(f"ServiceAccount default in {name} (is kube-controller-manager running?)",
                 lambda: _has_default_service_account(core, name), 30)
        yield name
    finally:
        try:
            core.delete_namespace(name, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise
