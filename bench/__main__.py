"""``python -m bench [--only NAME]...``: run the benchmarks, print one table, write docs/benchmarks.md."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from bench import autoscale, burst, engine_start, fleet, freshness, gateway, latency, memory, prefix, sizes
from bench.report import DOC, Row, previous_results, text_table, write_doc
from bench.rig import SCRAPE_INTERVAL, Out, Rig, kubeconfig_answers, llmdeployment, rig
from bench.tracker import expected_children, tracking
from devcluster.cluster import ClusterError, LocalCluster

MEASUREMENTS = {
    "apply": "apply -> children latency of single applies",
    "burst": "every burst size (the last one also builds the fleet), judged against the control plane's own floor",
    "fleet": "Events, idle cost, steady traffic, status freshness, scrape sweep and memory on the fleet "
             "(runs the fleet's burst)",
    "memory": "peak RSS as the fleet grows to each size of the slope table (runs the fleet's burst)",
    "autoscale": "the autoscaler's reaction to a queue on the cluster, its decision CPU at fleet size and its scale "
                 "changes per simulated hour",
    "engine-start": "real vLLM start-up with a cold and a warm compile cache, and apply to Ready from the hub with a "
                    "cold and a shared model cache",
    "gateway": "the gateway pinned to one core against direct requests to the same simulated engine: added latency, "
               "requests per second and streamed time to first byte",
    "prefix": "the engines' prefix cache hits through the gateway, PrefixHash against LeastLoad, on two real vLLM "
              "replicas",
}


T = TypeVar("T")


def _out(line: str) -> None:
    print(line, flush=True)


async def _attempt(figure: str, work: Awaitable[T]) -> T | Row:
    """A measurement that breaks becomes a failed row; the others still run."""
    try:
        return await work
    except Exception as exc:  # noqa: BLE001 - reported in the table and on the console
        _out(f"  {figure} failed: {type(exc).__name__}: {exc}")
        return Row(figure, f"error: {exc}"[:200], passed=False)


async def _guarded(figure: str, work: Awaitable[Row | list[Row]]) -> list[Row]:
    result = await _attempt(figure, work)
    return result if isinstance(result, list) else [result]


def _burst_counts(size: sizes.Size, selected: set[str]) -> list[int]:
    counts = [n for n in size.bursts[:-1] if "burst" in selected]
    return counts + [size.fleet] if selected & {"burst", "fleet", "memory"} else counts


def namespaces(size: sizes.Size, selected: set[str]) -> list[str]:
    """Where the selected measurements put LLMDeployments: the only namespaces the operator serves."""
    found = [latency.NAMESPACE] if "apply" in selected else []
    found += [burst.namespace_for(count) for count in _burst_counts(size, selected)]
    found += [autoscale.NAMESPACE] if "autoscale" in selected else []
    found += [engine_start.NAMESPACE, engine_start.HUB_NAMESPACE] if "engine-start" in selected else []
    found += [gateway.NAMESPACE] if "gateway" in selected else []
    return found + [prefix.NAMESPACE] if "prefix" in selected else found


async def _bursts(setting: Rig, size: sizes.Size, selected: set[str]) -> tuple[list[Row], list[str]]:
    """The bursts and the control-plane floor measured after them, each burst judged against that floor; then
    the rows of the fleet the last burst built, and the section on memory as that fleet grows."""
    timed: list[burst.Burst | Row] = []
    fleet_rows: list[Row] = []
    sections: list[str] = []
    for count in _burst_counts(size, selected):
        async with setting.namespace(burst.namespace_for(count)) as namespace:
            async with tracking(setting.kube, namespace, expected_children(llmdeployment("probe", namespace))) as seen:
                timed.append(await _attempt(f"burst of {count:,}", burst.measure(setting, seen, namespace, count)))
                if count == size.fleet and "fleet" in selected:
                    fleet_rows += await _guarded("fleet", fleet.measure(setting, seen, namespace, size))
                if count == size.fleet and "memory" in selected:
                    slope = await _attempt("memory", memory.measure(setting, seen, namespace, size))
                    if isinstance(slope, memory.Slope):
                        fleet_rows.append(slope.row())
                        sections.append(slope.table())
                    else:
                        fleet_rows.append(slope)
    floor: burst.Floor | Row | None = None
    if "burst" in selected:
        async with setting.namespace(burst.floor_namespace_for(size.fleet)) as namespace:
            floor = await _attempt("control-plane floor", burst.measure_floor(setting, namespace, size.fleet))
    measured = floor if isinstance(floor, burst.Floor) else None
    rows = [each.row(measured) if isinstance(each, burst.Burst) else each for each in timed]
    if floor is not None:
        rows.append(floor.row() if isinstance(floor, burst.Floor) else floor)
    return rows + fleet_rows, sections


async def run(kubeconfig: Path, size: sizes.Size, selected: set[str], out: Out) -> tuple[list[Row], list[str]]:
    """The rows of the table, and the sections that follow it."""
    rows: list[Row] = []
    sections: list[str] = []
    async with rig(kubeconfig, size.largest("memory" in selected), namespaces(size, selected), out) as setting:
        if "apply" in selected:
            out("apply -> children")
            rows += await _guarded("apply -> children", latency.measure(setting, size))
        if selected & {"burst", "fleet", "memory"}:
            out("bursts" + "".join(f" and the {name}" for name in ("fleet", "memory") if name in selected))
            burst_rows, sections = await _bursts(setting, size, selected)
            rows += burst_rows
        if "autoscale" in selected:
            out("autoscaler")
            rows += await _guarded("autoscaler reaction", autoscale.reaction(setting, size))
            rows += [autoscale.decision_cpu(size), *autoscale.scale_changes()]
        if "engine-start" in selected:
            out("engine start")
            rows += await _guarded("engine start", engine_start.measure(setting, size))
        if "gateway" in selected:
            out("gateway")
            rows += await _guarded("gateway", gateway.measure(setting, size))
        if "prefix" in selected:
            out("prefix cache by routing strategy")
            rows += await _guarded("prefix cache by routing strategy", prefix.measure(setting, size))
    return rows, sections


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
    previous = previous_results(DOC.read_text() if DOC.is_file() else "", size)
    _out(f"benchmarks, size {size.name}: {', '.join(name for name in MEASUREMENTS if name in selected)}")
    try:
        kubeconfig, started = _cluster()
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        rows, sections = asyncio.run(run(kubeconfig, size, selected, _out))
    finally:
        if started is not None:
            started.down(_out)
    _out("\n" + "\n\n".join([text_table(rows, previous), *sections]))
    if args.only:
        _out("\n(--only: docs/benchmarks.md left as it was)")
    else:
        measured = (latency, burst, fleet, freshness, memory, autoscale, engine_start, gateway, prefix)
        methods = [m.method(size) for m in measured]
        _out(f"\nwritten to {write_doc(rows, previous, size, SCRAPE_INTERVAL, methods, sections)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
