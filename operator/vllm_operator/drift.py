"""Does a live object still say what the operator applied?

Only fields the operator sets are compared, so defaults the apiserver fills in and fields other
controllers own never count as drift. Quantities compare by value ("1Gi" == "1024Mi").
"""

from __future__ import annotations

from typing import Any

from kubernetes.utils import parse_quantity


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have:
        return True
    if isinstance(want, (str, int)) and isinstance(have, (str, int)) and not isinstance(want, bool):
        try:
            return parse_quantity(want) == parse_quantity(have)
        except ValueError:
            return False
    return False


def matches(want: Any, have: Any, path: str = "") -> bool:
    """True when every field in ``want`` has the same value in ``have``."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(matches(v, have.get(k), f"{path}.{k}") for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list):
            return False
        if path.endswith("metadata.ownerReferences"):
            # Other owners may be listed too; ours must be among them.
            return all(any(matches(w, h) for h in have) for w in want)
        return len(want) == len(have) and all(matches(w, h, path) for w, h in zip(want, have))
    return _same_scalar(want, have)
