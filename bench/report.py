"""The one table: printed as text, and written as Markdown to docs/benchmarks.md."""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench.sizes import Size

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = ("figure", "result", "target", "verdict")
WIDTH = 110


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


def _paragraphs(*texts: str) -> str:
    """One wrapped paragraph per blank-line separated block, however the source broke its lines."""
    blocks = [block for text in texts for block in text.split("\n\n")]
    # Never break inside a code span such as `vllm-operator`.
    return "\n\n".join(textwrap.fill(" ".join(block.split()), WIDTH, break_on_hyphens=False, break_long_words=False)
                       for block in blocks)


def write_doc(rows: list[Row], size: Size, scrape_interval: float, methods: list[str]) -> Path:
    intro = _paragraphs(
        "`make bench` (or `PYTHONPATH=hack .venv/bin/python -m bench`) measures the operator against the local "
        "control plane and rewrites this page. `BENCH_SIZE=small` shrinks every size to a run of a few minutes; "
        "`--only NAME` runs one measurement and leaves this page alone. It reuses the cluster `KUBECONFIG` points "
        "at, or starts the local cluster and stops it afterwards.",
        f"Last run: {date.today().isoformat()}, {os.cpu_count()} cores, size `{size.name}`, operator scrape "
        f"interval {scrape_interval:g} s. The control plane, the simulated engines and the operator share "
        "those cores.")
    DOC.write_text(f"# Benchmarks\n\n{intro}\n\n{markdown_table(rows)}\n\n## What each figure is\n\n"
                   f"{_paragraphs(*methods)}\n")
    return DOC
