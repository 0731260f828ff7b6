"""kopf wiring: watches feed the controller; start-up and clean-up own its tasks. No logic here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import kopf
from prometheus_client import start_http_server

from vllm_operator import api
from vllm_operator.controller import Controller
from vllm_operator.engine_monitor import EngineMonitor
from vllm_operator.kube import Credentials, Kube
from vllm_operator.manifests import SELECTOR_LABEL


@dataclass
class RunOptions:
    kubeconfig: str | None = None
    metrics_port: int = 8080
    workers: int = 8
    scrape_interval: float = 15.0
    scrape_timeout: float = 5.0
    scrape_concurrency: int = 64


OPTIONS = RunOptions()
_state: dict[str, Any] = {}

_OWNED = {SELECTOR_LABEL: kopf.PRESENT}


def _controller() -> Controller:
    return _state["controller"]


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
    # The controller records its own Events; kopf's per-handler Events would only repeat them.
    settings.posting.enabled = False
    # Serve only what exists at start-up; watching CRDs and namespaces would need more RBAC.
    settings.scanning.disabled = True
    settings.watching.reconnect_backoff = 1.0
    if OPTIONS.metrics_port:
        start_http_server(OPTIONS.metrics_port)
    kube = Kube(Credentials.load(OPTIONS.kubeconfig))
    controller = Controller(kube)
    monitor = EngineMonitor(controller, OPTIONS.scrape_interval, OPTIONS.scrape_timeout, OPTIONS.scrape_concurrency)
    _state.update(
        kube=kube,
        controller=controller,
        monitor=monitor,
        tasks=[
            asyncio.create_task(controller.run_workers(OPTIONS.workers), name="reconcile-workers"),
            asyncio.create_task(monitor.run(), name="engine-monitor"),
        ],
    )


@kopf.on.cleanup()
async def stop(**_: Any) -> None:
    for task in _state.get("tasks", []):
        task.cancel()
    await asyncio.gather(*_state.get("tasks", []), return_exceptions=True)
    if "monitor" in _state:
        await _state["monitor"].close()
    if "kube" in _state:
        await _state["kube"].close()


# Handlers are coroutines on purpose: kopf runs plain functions in threads, and the controller's
# asyncio queue must only be touched from the event loop.
@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def llmdeployment_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_resource(event["type"], event["object"])


@kopf.on.event("pods", labels=_OWNED)
async def pod_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("Pod", event["type"], event["object"])


@kopf.on.event("apps", "v1", "deployments", labels=_OWNED)
async def deployment_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("Deployment", event["type"], event["object"])


@kopf.on.event("services", labels=_OWNED)
async def service_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("Service", event["type"], event["object"])


@kopf.on.event("persistentvolumeclaims", labels=_OWNED)
async def claim_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("PersistentVolumeClaim", event["type"], event["object"])


@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=_OWNED)
async def disruption_budget_changed(event: kopf.RawEvent, **_: Any) -> None:
    _controller().observe_child("PodDisruptionBudget", event["type"], event["object"])
