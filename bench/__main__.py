"""``python -m bench [--only NAME]...``: run the benchmarks, print one table, write docs/benchmarks.md."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable
from pathlib import Path

from bench import burst, engine_start, fleet, latency, sizes
from bench.report import Row, text_table, write_doc
from bench.rig import SCRAPE_INTERVAL, Out, Rig, kubeconfig_answers, llmdeployment, rig
from bench.tracker import expected_children, tracking
from devcluster.cluster import ClusterError, LocalCluster

MEASUREMENTS = {
    "apply": "apply -> children latency of single applies",
    "burst": "every burst size (the last one also builds the fleet), and the control plane's own floor",
    "fleet": "idle cost, steady traffic, scrape sweep and memory on the fleet (runs the fleet's burst)",
    "engine-start": "real vLLM start-up with a cold and a warm compile cache",
}


def _out(line: str) -> None:
    print(line, flush=True)


async def _guarded(figure: str, work: Awaitable[Row | list[Row]]) -> list[Row]:
    """A measurement that breaks becomes a failed row; the others still run."""
    try:
        result = await work
    except Exception as exc:  # noqa: BLE001 - reported in the table and on the console
        _out(f"  {figure} failed: {type(exc).__name__}: {exc}")
        return [Row(figure, f"error: {exc}"[:200], passed=False)]
    return result if isinstance(result, list) else [result]


async def _bursts(setting: Rig, size: sizes.Size, selected: set[str]) -> list[Row]:
    rows = []
    counts = [n for n in size.bursts[:-1] if "burst" in selected]
    if selected & {"burst", "fleet"}:
        counts.append(size.fleet)
    for count in counts:
        async with setting.namespace(burst.namespace_for(count)) as namespace:
            async with tracking(setting.kube, namespace, expected_children(llmdeployment("probe", namespace))) as seen:
                rows += await _guarded(f"burst of {count:,}", burst.measure(setting, seen, namespace, count))
                if count == size.fleet and "fleet" in selected:
                    rows += await _guarded("fleet", fleet.measure(setting, seen, namespace, size))
    if "burst" in selected:
        async with setting.namespace(burst.floor_namespace_for(size.fleet)) as namespace:
            rows += await _guarded("control-plane floor", burst.measure_floor(setting, namespace, size.fleet))
    return rows


async def run(kubeconfig: Path, size: sizes.Size, selected: set[str], out: Out) -> list[Row]:
    rows: list[Row] = []
    async with rig(kubeconfig, size.fleet, out) as setting:
        if "apply" in selected:
            out("apply -> children")
            rows += await _guarded("apply -> children", latency.measure(setting, size))
        if selected & {"burst", "fleet"}:
            out("bursts" + (" and the fleet" if "fleet" in selected else ""))
            rows += await _bursts(setting, size, selected)
        if "engine-start" in selected:
            out("engine start")
            rows += await _guarded("engine start", engine_start.measure(setting, size))
    return rows


def _cluster() -> tuple[Path, LocalCluster | None]:
    """The cluster KUBECONFIG points at when it answers, else the local one (and whether we started it)."""
    configured = Path(os.environ.get("KUBECONFIG", ""))
    if configured.is_file() and kubeconfig_answers(configured):
        _out(f"using the cluster of KUBECONFIG={configured}")
        return configured, None
    cluster = LocalCluster()
    started = cluster.up(_out)
    return cluster.kubeconfig, cluster if started else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        epilog="measurements: " + "; ".join(f"{name}: {what}" for name, what in MEASUREMENTS.items())
               + f". {sizes.SIZE_ENV}=small shrinks every size.")
    parser.add_argument("--only", action="append", choices=list(MEASUREMENTS), metavar="NAME",
                        help="run only this measurement (repeatable); the page in docs/ is then left alone")
    args = parser.parse_args(argv)
    size = sizes.from_env()
    selected = set(args.only or MEASUREMENTS)
    _out(f"benchmarks, size {size.name}: {', '.join(name for name in MEASUREMENTS if name in selected)}")
    try:
        kubeconfig, started = _cluster()
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        rows = asyncio.run(run(kubeconfig, size, selected, _out))
    finally:
        if started is not None:
            started.down(_out)
    _out("\n" + text_table(rows))
    if args.only:
        _out("\n(--only: docs/benchmarks.md left as it was)")
    else:
        methods = [m.method(size) for m in (latency, burst, fleet, engine_start)]
        _out(f"\nwritten to {write_doc(rows, size, SCRAPE_INTERVAL, methods)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
