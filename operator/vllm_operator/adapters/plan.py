"""What to load into and unload from one engine, from what the spec wants and what the engine says it has.

Pure functions. An engine's own /v1/models is the truth: an adapter counts as loaded only when the engine lists
it there, so a restarted engine (which lists none) gets every adapter again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# A load the engine refused is tried again after this long (the same folder), or at once when its folder changes.
RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class Refusal:
    """A load the engine refused: of which folder, when, and the engine's words."""

    path: str
    at: float
    message: str


@dataclass(frozen=True)
class Plan:
    unload: tuple[str, ...] = ()
    load: Mapping[str, str] = field(default_factory=dict)  # name -> folder


def loaded_adapters(models: Mapping[str, Any], served_name: str) -> dict[str, str]:
    """Adapter name -> folder from an engine's /v1/models body: the entries whose parent is the served model."""
    return {str(entry["id"]): str(entry.get("root") or "") for entry in models.get("data") or []
            if isinstance(entry, Mapping) and entry.get("parent") == served_name and "id" in entry}


def plan(wanted: Mapping[str, str], loaded: Mapping[str, str], refused: Mapping[str, Refusal], now: float,
         retry_seconds: float = RETRY_SECONDS) -> Plan:
    """Unload what is not wanted or comes from another folder now; load what is missing, but not a folder the
    engine refused less than ``retry_seconds`` ago."""
    unload = tuple(sorted(name for name, path in loaded.items() if wanted.get(name) != path))
    load = {name: path for name, path in sorted(wanted.items())
            if loaded.get(name) != path and not _waiting(refused.get(name), path, now, retry_seconds)}
    return Plan(unload, load)


def _waiting(refusal: Refusal | None, path: str, now: float, retry_seconds: float) -> bool:
    return refusal is not None and refusal.path == path and now - refusal.at < retry_seconds


def settled(wanted: Mapping[str, str], loaded: Mapping[str, str], refused: Mapping[str, Refusal]) -> bool:
    """Whether every wanted adapter is loaded from its folder or was refused from it: the engine may take traffic."""
    return all(loaded.get(name) == path or (name in refused and refused[name].path == path)
               for name, path in wanted.items())
