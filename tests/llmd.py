"""Helpers for tests that drive LLMDeployments through the real apiserver."""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devcluster import engine
from devcluster.prefill import prefill_model_cache
from devcluster.pytest_plugin import wait_for
from vllm_operator import api
from vllm_operator.render.manifests import SELECTOR_LABEL

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
Obj = dict[str, Any]


def example(name: str) -> Obj:
    manifest: Obj = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    return manifest


def custom(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def create(api_client: client.ApiClient, namespace: str, manifest: Obj) -> Obj:
    body = copy.deepcopy(manifest)
    body["metadata"]["namespace"] = namespace
    created: Obj = custom(api_client).create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)
    return created


def get(api_client: client.ApiClient, namespace: str, name: str) -> Obj | None:
    try:
        found: Obj = custom(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return found


def patch_spec(api_client: client.ApiClient, namespace: str, name: str, spec: Obj) -> Obj:
    patched: Obj = custom(api_client).patch_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"spec": spec})
    return patched


def patch_metadata(api_client: client.ApiClient, namespace: str, name: str, metadata: Obj) -> Obj:
    patched: Obj = custom(api_client).patch_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"metadata": metadata})
    return patched


def delete(api_client: client.ApiClient, namespace: str, name: str) -> None:
    custom(api_client).delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)


def condition(obj: Obj | None, type_: str) -> Obj | None:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def wait_phase(api_client: client.ApiClient, namespace: str, name: str, phase: str, timeout: float = 60) -> Obj:
    """The resource once its status reports ``phase`` for its current generation."""

    def reached() -> Obj | None:
        obj = get(api_client, namespace, name)
        status = (obj or {}).get("status") or {}
        current = status.get("observedGeneration") == (obj or {}).get("metadata", {}).get("generation")
        return obj if obj is not None and current and status.get("phase") == phase else None

    def last_seen() -> str:
        status = (get(api_client, namespace, name) or {}).get("status") or {}
        return f"phase {phase} of {namespace}/{name} (last status: {status})"

    try:
        return wait_for(f"phase {phase}", reached, timeout)
    except AssertionError:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {last_seen()}") from None


def events_once(api_client: client.ApiClient, namespace: str, name: str,
                holds: Callable[[list[client.CoreV1Event]], bool], timeout: float = 15) -> list[client.CoreV1Event]:
    """The Events about ``name`` once ``holds`` says they include what a test looks for. The operator posts Events
    after the status write they describe, so a test that saw the status may be a moment ahead of them."""
    def listed() -> list[client.CoreV1Event] | None:
        found = list(client.CoreV1Api(api_client).list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}").items)
        return found if holds(found) else None
    return wait_for(f"the Events of {name}", listed, timeout)


def owned_pods(api_client: client.ApiClient, namespace: str, name: str) -> list[client.V1Pod]:
    """The engine Pods (not those of its download or benchmark Jobs), but those being deleted."""
    pods = client.CoreV1Api(api_client).list_namespaced_pod(
        namespace, label_selector=f"{SELECTOR_LABEL}={name},app.kubernetes.io/component=engine")
    return [p for p in pods.items if p.metadata.deletion_timestamp is None]


@contextlib.contextmanager
def serving(api_client: client.ApiClient, prefix: str, manifest: Obj, timeout: float,
            prepare: Callable[[str], None] | None = None) -> Iterator[str]:
    """A namespace of its own where ``manifest`` (the tiny model on real vLLM, its cache claim pre-filled as a
    download would) is Ready; deleted afterwards. ``prepare`` puts what the manifest refers to in the namespace
    first."""
    if not engine.engine_ready() or engine.model_snapshot() is None:
        raise RuntimeError("the engine venv or the tiny model is missing; `make test` builds them")
    namespace = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        wait_for("the default ServiceAccount", lambda: core.list_namespaced_service_account(namespace).items, 30)
        if prepare is not None:
            prepare(namespace)
        create(api_client, namespace, manifest)
        prefill_model_cache(api_client, namespace, manifest["metadata"]["name"])
        wait_phase(api_client, namespace, manifest["metadata"]["name"], "Ready", timeout)
        yield namespace
    finally:
        core.delete_namespace(namespace)
