"""The benchmark Job's program: vLLM's ``vllm bench serve``, then its figures as the termination message.

It runs in the engine image, as ``python3 -c <this file> <vllm bench serve options>``, so it uses the
standard library and vLLM only. It calls what the ``vllm bench serve`` command calls (the argument
parser and ``main`` of ``vllm.benchmarks.serve``) rather than the ``vllm`` console script, because
the CPU wheels of vLLM ship a script that fails at start-up, and because ``main`` hands back the
result without a file in between. The message file (``BENCHMARK_MESSAGE_PATH``, the container's
terminationMessagePath) gets the result's aggregate figures, and the start and end times, as JSON:
the operator reads it from the Pod's status, so it must stay within kubelet's 4 KiB.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from typing import Any

MESSAGE_BYTES = 4096
ERROR_CHARS = 300


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """The result's single values (settings and aggregate figures); per-request lists are left out."""
    kept = {key: value for key, value in result.items() if value is None or isinstance(value, (str, int, float))}
    errors = [error for error in result.get("errors") or [] if error]
    if errors:
        # One request's error says what went wrong; the count is in "failed".
        kept["first_error"] = errors[0][-ERROR_CHARS:]
    return kept


def message(report: dict[str, Any], limit: int = MESSAGE_BYTES) -> str:
    """``report`` as compact JSON within ``limit`` bytes: the result's longest texts are dropped first."""
    report = {**report, "result": dict(report["result"])} if "result" in report else dict(report)
    while len((text := json.dumps(report, separators=(",", ":"))).encode()) > limit:
        texts = [key for key, value in report.get("result", {}).items() if isinstance(value, str)]
        if not texts:
            return json.dumps({"startTime": report.get("startTime"), "completionTime": report.get("completionTime"),
                               "error": "the benchmark's figures do not fit in a termination message"})
        del report["result"][max(texts, key=lambda key: len(report["result"][key]))]
    return text


def run(argv: list[str]) -> dict[str, Any]:
    """Run the benchmark with ``argv`` (options of ``vllm bench serve``); the report for the message."""
    report: dict[str, Any] = {"startTime": now()}
    try:
        from vllm.benchmarks.serve import add_cli_args, main
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:
        report.update(completionTime=now(), error=f"this engine image has no vLLM serving benchmark ({exc}); "
                      "it needs vLLM 0.10 or later")
        return report
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    try:
        result = main(parser.parse_args(argv))
    except (Exception, SystemExit) as exc:  # the message is all the operator gets to see
        report.update(completionTime=now(), error=f"{type(exc).__name__}: {exc}"[-ERROR_CHARS:])
        return report
    report.update(completionTime=now(), result=figures(result))
    return report


if __name__ == "__main__":
    outcome = run(sys.argv[1:])
    with open(os.environ.get("BENCHMARK_MESSAGE_PATH", "/dev/termination-log"), "w", encoding="utf-8") as file:
        file.write(message(outcome))
    print(json.dumps(outcome), flush=True)
    sys.exit(1 if "error" in outcome else 0)
