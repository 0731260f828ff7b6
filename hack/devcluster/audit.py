"""The local apiserver's audit log: which calls a client made.

The apiserver writes one JSON event per request at level Metadata (who, what verb on which resource, with which
User-Agent), leaving out the cluster's own components, whose calls would be most of the volume. The operator and
the gateway the tests start run as users of their own (``cluster.OPERATOR``, ``cluster.GATEWAY``); tests read the
log to hold the chart's RBAC to what they really call.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

AUDIT_LOG = Path("logs") / "audit.log"
MAX_SIZE_MB = 200
MAX_BACKUPS = 3


def policy(quiet_users: Iterable[str]) -> str:
    """The audit policy: every request at level Metadata, once (when it is answered), but for ``quiet_users``
    and health checks."""
    return yaml.safe_dump({
        "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
        "omitStages": ["RequestReceived", "ResponseStarted"],
        "rules": [
            {"level": "None", "users": sorted(quiet_users)},
            {"level": "None", "nonResourceURLs": ["/healthz*", "/readyz*", "/livez*", "/version", "/openapi*",
                                                  "/api", "/apis", "/apis/*"]},
            {"level": "Metadata"},
        ],
    }, sort_keys=False)


def flags(state_dir: Path, policy_file: Path) -> list[str]:
    return [f"--audit-policy-file={policy_file}", f"--audit-log-path={state_dir / AUDIT_LOG}",
            f"--audit-log-maxsize={MAX_SIZE_MB}", f"--audit-log-maxbackup={MAX_BACKUPS}", "--audit-log-format=json"]


def events(state_dir: Path) -> Iterator[dict]:
    """Every audit event the cluster kept, oldest first (rotated files included)."""
    log = state_dir / AUDIT_LOG
    rotated = sorted(log.parent.glob(f"{log.stem}-*{log.suffix}"))
    for path in [*rotated, log] if log.exists() else rotated:
        with path.open() as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line)


def calls(state_dir: Path, username: str) -> set[tuple[str, str, str]]:
    """(API group, resource[/subresource], verb) of every request ``username`` made, as RBAC names them."""
    found = set()
    for event in events(state_dir):
        target = event.get("objectRef")
        if (event.get("user") or {}).get("username") != username or not target:
            continue
        resource = target.get("resource", "")
        if target.get("subresource"):
            resource += f"/{target['subresource']}"
        found.add((target.get("apiGroup", ""), resource, event["verb"]))
    return found
