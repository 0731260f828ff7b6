"""Small helpers over the synchronous ``kubernetes`` client; objects are handled as plain dicts."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from devcluster.localruntime.log import event

Obj = dict[str, Any]
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
# Every call gets a deadline so a vanished API server cannot hang the agent (connect, read).
TIMEOUT = (5, 30)


def api_client(kubeconfig: str) -> client.ApiClient:
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    # One connection per pod worker thread plus the watches, instead of urllib3's default of 4.
    configuration.connection_pool_maxsize = 64
    return client.ApiClient(configuration)


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 404


def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
    """Call a client method and return the response body as a plain dict."""
    response = method(*args, _preload_content=False, _request_timeout=TIMEOUT, **kwargs)
    body: Obj = json.loads(response.data)
    return body


def read_or_none(method: Callable[..., Any], *args: Any) -> Obj | None:
    try:
        return call(method, *args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def list_items(list_call: Callable[..., Any], **kwargs: Any) -> tuple[list[Obj], str]:
    body = call(list_call, **kwargs)
    return body["items"], body["metadata"]["resourceVersion"]


def watch_forever(
    what: str,
    list_call: Callable[..., Any],
    on_sync: Callable[[list[Obj]], None],
    on_event: Callable[[str, Obj], None],
    stop: threading.Event,
    **kwargs: Any,
) -> None:
    """List, hand the snapshot to ``on_sync``, then watch from its resourceVersion; re-list on errors.

    The snapshot lets the caller drop whatever it tracks that vanished while it was not watching.
    """
    while not stop.is_set():
        try:
            items, version = list_items(list_call, **kwargs)
            on_sync(items)
            while not stop.is_set():
                stream = watch.Watch().stream(
                    list_call, resource_version=version, timeout_seconds=60, allow_watch_bookmarks=True,
                    deserialize=False, _request_timeout=(5, 90), **kwargs,
                )
                for change in stream:
                    obj = change["object"]
                    version = obj["metadata"]["resourceVersion"]
                    if change["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        on_event(change["type"], obj)
                    if stop.is_set():
                        break
        except ApiException as exc:
            if exc.status != 410:
                event("watch.error", "warning", what=what, status=exc.status, reason=exc.reason)
                stop.wait(2)
        except Exception as exc:  # noqa: BLE001 - a watch must outlive any single failure
            event("watch.error", "warning", what=what, error=repr(exc))
            stop.wait(2)
