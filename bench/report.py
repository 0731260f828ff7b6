"""The one table: printed as text, and written as Markdown to docs/benchmarks.md."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench.sizes import Size

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = ("figure", "result", "target", "verdict")


@dataclass(frozen=True)
class Row:
    figure: str
    result: str
    target: str = "-"
    passed: bool | None = None  # None: a figure without a target

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "-"}[self.passed]

    def cells(self) -> tuple[str, str, str, str]:
        return self.figure, self.result, self.target, self.verdict


def text_table(rows: list[Row]) -> str:
    table = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def write_doc(rows: list[Row], size: Size, scrape_interval: float, methods: str) -> Path:
    DOC.write_text(f"""# Benchmarks

`make bench` (or `PYTHONPATH=hack .venv/bin/python -m bench`) measures the operator against the local
control plane and rewrites this page. `BENCH_SIZE=small` shrinks every size to a run of a few minutes;
`--only NAME` runs one measurement and leaves this page alone. It reuses the cluster `KUBECONFIG`
points at, or starts the local cluster and stops it afterwards.

Last run: {date.today().isoformat()}, {os.cpu_count()} cores, size `{size.name}`, operator scrape interval
{scrape_interval:g} s. The control plane, the simulated engines and the operator share those cores.

{markdown_table(rows)}

## What each figure is

{methods}
""")
    return DOC
