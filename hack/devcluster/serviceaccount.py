"""A kubeconfig that authenticates as a ServiceAccount, with a token from the TokenRequest API:
how the operator runs as a local process with exactly the rights the Helm chart grants."""

from __future__ import annotations

from pathlib import Path

import yaml
from kubernetes import client

TOKEN_SECONDS = 24 * 3600


def service_account_kubeconfig(api: client.ApiClient, admin_kubeconfig: Path, namespace: str,
                               service_account: str, destination: Path) -> Path:
    """Write a kubeconfig for ``namespace/service_account`` next to the admin one's server and CA."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": TOKEN_SECONDS}}
    token = client.CoreV1Api(api).create_namespaced_service_account_token(service_account, namespace, request)
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    user = f"system:serviceaccount:{namespace}:{service_account}"
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": user,
        "clusters": [cluster],
        "users": [{"name": user, "user": {"token": token.status.token}}],
        "contexts": [{"name": user, "context": {"cluster": cluster["name"], "user": user, "namespace": namespace}}],
    }
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(yaml.safe_dump(config))
    destination.chmod(0o600)
    return destination
