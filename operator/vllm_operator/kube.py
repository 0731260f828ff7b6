"""A small asynchronous Kubernetes API client for the few calls the reconciler makes.

kopf does the watching; writes go through here so that many LLMDeployments reconcile
concurrently over one pooled connection set, without a thread per request.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import aiohttp
import kubernetes

from vllm_operator import __version__, api

FIELD_MANAGER = "vllm-operator"
USER_AGENT = f"vllm-operator/{__version__}"

# kind -> (API path prefix, plural) for every kind the operator writes.
RESOURCES: Mapping[str, tuple[str, str]] = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    api.KIND: (f"/apis/{api.GROUP}/{api.VERSION}", api.PLURAL),
    "Event": ("/api/v1", "events"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
}


class KubeError(Exception):
    """An API call the apiserver refused; ``str()`` is its own explanation."""

    def __init__(self, status: int, message: str, reason: str = "", causes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.causes = causes  # details.causes[].reason, such as NamespaceTerminating


@dataclass(frozen=True)
class Credentials:
    host: str
    ssl_context: ssl.SSLContext | bool
    configuration: kubernetes.client.Configuration

    @classmethod
    def load(cls, kubeconfig: str | None = None) -> Credentials:
        """In-cluster credentials when running in a Pod, the kubeconfig otherwise."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        context: ssl.SSLContext | bool
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
        else:
            context = False
        return cls(configuration.host.rstrip("/"), context, configuration)

    def headers(self) -> dict[str, str]:
        # Called per request: the in-cluster token rotates and the client's hook re-reads it.
        # Client versions differ in the key name; the value already carries "Bearer ".
        token = self.configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        return {"Authorization": token} if token else {}


def object_path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


# Each TLS connection holds about 300 KiB (asyncio's read buffer and OpenSSL's), and the apiserver, not
# the pool, limits how fast writes go: 64 connections cost as much memory as the stores of 1,000 LLMDeployments.
DEFAULT_CONNECTIONS = 16


class Kube:
    def __init__(self, credentials: Credentials, max_connections: int = DEFAULT_CONNECTIONS) -> None:
        self._credentials = credentials
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                base_url=self._credentials.host,
                connector=aiohttp.TCPConnector(limit=self._max_connections, ssl=self._credentials.ssl_context),
                timeout=aiohttp.ClientTimeout(total=30),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {**self._credentials.headers(), "Content-Type": content_type, "Accept": "application/json"}
        data = None if body is None else json.dumps(body)
        try:
            async with self._client().request(method, path, data=data, params=params, headers=headers) as response:
                text = await response.text()
                try:
                    payload = json.loads(text) if text else {}
                except ValueError:  # a proxy's error page, say
                    payload = None
                if response.status >= 400:
                    if not isinstance(payload, dict):
                        payload = {}
                    causes = tuple(c.get("reason", "") for c in (payload.get("details") or {}).get("causes") or [])
                    message = payload.get("message") or text or response.reason or ""
                    raise KubeError(response.status, message, payload.get("reason", ""), causes)
                if not isinstance(payload, dict):
                    raise KubeError(response.status, f"{method} {path}: the answer is not a JSON object: {text[:200]}")
                return payload
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise KubeError(0, f"{method} {path}: {exc or type(exc).__name__}") from exc

    async def apply(self, manifest: Mapping[str, Any], subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply under the operator's field manager, taking over conflicting fields."""
        meta = manifest["metadata"]
        return await self.request(
            "PATCH",
            object_path(manifest["kind"], meta["namespace"], meta["name"], subresource),
            body=manifest,
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return await self.request("GET", object_path(kind, namespace, name))

    async def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", object_path(manifest["kind"], manifest["metadata"]["namespace"]), body=manifest)

    async def replace(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """PUT: with ``metadata.resourceVersion`` set, a 409 means someone else wrote the object first."""
        meta = manifest["metadata"]
        return await self.request("PUT", object_path(manifest["kind"], meta["namespace"], meta["name"]), body=manifest)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self.request("DELETE", object_path(kind, namespace, name), body={"propagationPolicy": "Background"})
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def apply_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        return await self.apply(
            {
                "apiVersion": f"{api.GROUP}/{api.VERSION}",
                "kind": api.KIND,
                "metadata": {"name": name, "namespace": namespace},
                "status": status,
            },
            subresource="status",
        )

    async def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = involved["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.create(event)
