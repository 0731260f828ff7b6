"""CustomResourceDefinitions on the local cluster: applied server-side (a rerun brings them up to date) and
waited for until the API server serves them."""

from __future__ import annotations

from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

APPLY_PATCH = "application/apply-patch+yaml"
TIMEOUT = (5, 30)  # connect, read


def apply(api: client.ApiClient, manifest: dict[str, Any], manager: str) -> None:
    client.ApiextensionsV1Api(api).patch_custom_resource_definition(
        manifest["metadata"]["name"], manifest, field_manager=manager, force=True, _content_type=APPLY_PATCH,
        _request_timeout=TIMEOUT)


def established(api: client.ApiClient, name: str) -> bool:
    try:
        found = client.ApiextensionsV1Api(api).read_custom_resource_definition(name, _request_timeout=TIMEOUT)
    except ApiException:
        return False  # not there yet
    return any(c.type == "Established" and c.status == "True" for c in found.status.conditions or [])
