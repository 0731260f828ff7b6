"""The LeaderWorkerSet controller of the local cluster: its configuration, CRD and webhook registrations.

The controller is the real one (``binaries.LWS``), run as a local process. What differs from an install of its
release manifests: the API server cannot reach in-cluster Services here, so the webhooks are registered by URL
on loopback with this cluster's CA as their ``caBundle``, and the controller's own certificate management is off
(it serves a certificate the cluster's CA issued for 127.0.0.1).
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devcluster import crds
from devcluster.binaries import LWS

CRD_NAME = "leaderworkersets.leaderworkerset.x-k8s.io"
CRD_FILE = "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
# Upstream's kustomization prefixes every object with "lws-" (config/default).
NAME_PREFIX = "lws-"
# Which patch file replaces which webhooks of config/webhook/manifests.yaml, as its kustomization does.
PATCHES = {"MutatingWebhookConfiguration": "mutating-patch.yaml",
           "ValidatingWebhookConfiguration": "validating-patch.yaml"}
TIMEOUT = (5, 30)  # connect, read
MANAGER = "devcluster"

Obj = dict[str, Any]

def _manifest_docs(name: str) -> list[Any]:
    path = LWS.directory / name
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def configuration(webhook_port: int, metrics_port: int, health_port: int, cert_dir: Path) -> str:
    """The controller's ``--config`` file: every listener on loopback, certificates from ``cert_dir``."""
    return yaml.safe_dump({
        "apiVersion": "config.lws.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        # One instance only: a lease left by the previous run would hold it back for its duration.
        "leaderElection": {"leaderElect": False},
        # Off: it would write its certificates into a Secret and patch them into Service-backed webhooks.
        "internalCertManagement": {"enable": False},
    }, sort_keys=False)


def write_serving_cert(cert_dir: Path, cert: Path, key: Path) -> None:
    """Put the serving pair where controller-runtime's webhook server looks (``tls.crt``/``tls.key``)."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    (cert_dir / "tls.crt").write_bytes(cert.read_bytes())
    target = cert_dir / "tls.key"
    target.write_bytes(key.read_bytes())
    target.chmod(0o600)


def crd() -> Obj:
    [document] = _manifest_docs(CRD_FILE)
    return document


def _apply_patch(configuration: Obj, operations: list[Obj]) -> None:
    # The patches only replace whole webhooks; anything else means the upstream layout changed.
    for operation in operations:
        parts = operation["path"].strip("/").split("/")
        if operation["op"] != "replace" or len(parts) != 2 or parts[0] != "webhooks":
            raise ValueError(f"unexpected patch operation in the LWS webhook manifests: {operation}")
        configuration["webhooks"][int(parts[1])] = copy.deepcopy(operation["value"])


def webhook_configurations(webhook_port: int, ca_bundle: bytes) -> list[Obj]:
    """Upstream's Mutating- and ValidatingWebhookConfiguration, patched as its kustomization patches them, with
    each Service reference turned into a URL of the controller on loopback."""
    found = []
    for document in _manifest_docs("manifests.yaml"):
        document = copy.deepcopy(document)
        _apply_patch(document, _manifest_docs(PATCHES[document["kind"]])[0])
        document["metadata"]["name"] = NAME_PREFIX + document["metadata"]["name"]
        for webhook in document["webhooks"]:
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": f"https://127.0.0.1:{webhook_port}{path}",
                                       "caBundle": base64.b64encode(ca_bundle).decode()}
        found.append(document)
    return found


def install(api: client.ApiClient, webhook_port: int, ca_bundle: bytes) -> None:
    """The CRD and the webhook registrations, applied server-side: a rerun brings them up to date (ports may differ
    between runs)."""
    crds.apply(api, crd(), MANAGER)
    admission = client.AdmissionregistrationV1Api(api)
    for document in webhook_configurations(webhook_port, ca_bundle):
        patch = (admission.patch_mutating_webhook_configuration
                 if document["kind"] == "MutatingWebhookConfiguration"
                 else admission.patch_validating_webhook_configuration)
        patch(document["metadata"]["name"], document, field_manager=MANAGER, force=True,
              _content_type=crds.APPLY_PATCH, _request_timeout=TIMEOUT)


def admits(api: client.ApiClient) -> bool:
    """Dry-run LeaderWorkerSets show the API server calling both webhooks: a valid one comes back defaulted by the
    mutating webhook, one of size 0 is refused by the validating one. That proves the controller serves them, on
    the registered URL and certificate, and that the API server has loaded the registrations. (Probing the paths
    directly would log every probe as a bad request, with a stack trace.)"""
    custom = client.CustomObjectsApi(api)

    def dry_run(size: int) -> Obj:
        probe = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
                 "metadata": {"generateName": "readiness-probe-"},
                 "spec": {"leaderWorkerTemplate": {"size": size, "workerTemplate": {"spec": {
                     "containers": [{"name": "probe", "image": "probe"}]}}}}}
        return custom.create_namespaced_custom_object("leaderworkerset.x-k8s.io", "v1", "default",
                                                      "leaderworkersets", probe, dry_run="All",
                                                      _request_timeout=TIMEOUT)

    try:
        # Only the webhook sets a subdomain policy; the CRD's schema has no default for it.
        if not dry_run(1).get("spec", {}).get("networkConfig", {}).get("subdomainPolicy"):
            return False
        dry_run(0)
    except ApiException as exc:
        return exc.status == 403 and "vleaderworkerset.kb.io" in (exc.body or "")
    except Exception:  # noqa: BLE001 - a transient API error just means "not yet"
        return False
    return False
