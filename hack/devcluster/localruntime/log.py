"""The agent's own log: one JSON object per line on stderr, one line per event."""

from __future__ import annotations

import json
import sys
import threading
from datetime import UTC, datetime

_lock = threading.Lock()


def event(name: str, level: str = "info", **fields: object) -> None:
    record = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "level": level,
              "event": name, **fields}
    line = json.dumps(record, default=str)
    with _lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
