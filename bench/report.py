"""The one table: printed as text, and written as Markdown to docs/benchmarks.md, beside the results
the page held from the run before; sections with tables of their own follow it."""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench.sizes import Size

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = ("figure", "previous", "result", "target", "verdict")
WIDTH = 110
# What ``page`` writes of the run's size; any whitespace, as wrapping may break the line there.
SIZE_PATTERN = re.compile(r"Last run: .*?\bsize\s+`(\w+)`", re.DOTALL)
# A Markdown cell separator: a pipe that ``markdown_table`` did not escape.
CELL_PATTERN = re.compile(r"(?<!\\)\|")

Previous = Mapping[str, str]  # figure -> result of the run before


@dataclass(frozen=True)
class Row:
    figure: str
    result: str
    target: str = "-"
    passed: bool | None = None  # None: a figure without a target

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "-"}[self.passed]

    def cells(self, previous: Previous) -> tuple[str, ...]:
        return self.figure, previous.get(self.figure, "-"), self.result, self.target, self.verdict


def times(count: int) -> str:
    """How often, in words, for the method texts."""
    return "once" if count == 1 else f"{count} times"


def text_table(rows: list[Row], previous: Previous) -> str:
    table = [HEADER, *(row.cells(previous) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row], previous: Previous) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row.cells(previous)) + " |" for row in rows]
    return "\n".join(lines)


def previous_results(text: str, size: Size) -> dict[str, str]:
    """The results a page written by ``page`` holds, by figure; none when that run was of another size,
    as some figures (steady traffic per LLMDeployment) keep their name across sizes."""
    ran = SIZE_PATTERN.search(text)
    if ran is None or ran.group(1) != size.name:
        return {}
    table = [[cell.strip().replace("\\|", "|") for cell in CELL_PATTERN.split(line)[1:-1]]
             for line in _first_table(text.splitlines())]
    if not table:
        return {}
    header, _rule, *body = table
    # By the header's names, so a page with other columns (before "previous" was one) reads too.
    figure, result = header.index("figure"), header.index("result")
    return {cells[figure]: cells[result] for cells in body}


def _first_table(lines: list[str]) -> list[str]:
    """The lines of the page's first table: the sections after it have tables of their own."""
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def _paragraphs(*texts: str) -> str:
    """One wrapped paragraph per blank-line separated block, however the source broke its lines."""
    blocks = [block for text in texts for block in text.split("\n\n")]
    # Never break inside a code span such as `vllm-operator`.
    return "\n\n".join(textwrap.fill(" ".join(block.split()), WIDTH, break_on_hyphens=False, break_long_words=False)
                       for block in blocks)


def page(rows: list[Row], previous: Previous, size: Size, scrape_interval: float, methods: list[str],
         sections: Sequence[str] = ()) -> str:
    intro = _paragraphs(
        "`make bench` (or `PYTHONPATH=hack .venv/bin/python -m bench`) measures the operator against the local "
        "control plane and rewrites this page. `BENCH_SIZE=small` shrinks every size to a run of a few minutes; "
        "`--only NAME` runs one measurement and leaves this page alone. It reuses the cluster `KUBECONFIG` points "
        "at, or starts the local cluster and stops it afterwards.",
        f"Last run: {date.today().isoformat()}, {os.cpu_count()} cores, size `{size.name}`, operator scrape "
        f"interval {scrape_interval:g} s. The control plane, the simulated engines and the operator share "
        "those cores. The previous column is the result the run before this one wrote here, when it was of the "
        "same size.")
    return (f"# Benchmarks\n\n{intro}\n\n{markdown_table(rows, previous)}\n\n"
            + "".join(f"{section}\n\n" for section in sections)
            + f"## What each figure is\n\n{_paragraphs(*methods)}\n")


def write_doc(rows: list[Row], previous: Previous, size: Size, scrape_interval: float, methods: list[str],
              sections: Sequence[str] = ()) -> Path:
    DOC.write_text(page(rows, previous, size, scrape_interval, methods, sections))
    return DOC
