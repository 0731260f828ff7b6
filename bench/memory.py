"""The operator's memory as its fleet grows: peak RSS at each fleet size, and the straight line through them
carried on to 10,000 LLMDeployments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench import burst, fleet
from bench.report import Row
from bench.rig import Rig, peak_rss_mib, rss_mib
from bench.sizes import Size
from bench.tracker import Tracker

EXTRAPOLATE_TO = 10_000


def method(size: Size) -> str:
    steps = " and ".join(f"{n:,}" for n in size.growth)
    return f"""\
**memory by fleet size**: after the measurements on the fleet of {size.fleet:,}, the same operator process sees its
fleet grow to {steps} LLMDeployments (each step applied at once, like a burst, one simulated engine each). At each
size, once every LLMDeployment is `Ready` and scraped and the operator's writes have stood still for two scrape
intervals, its peak resident memory (`VmHWM`) and its resident memory then (`VmRSS`) are read. The peak at a size
is therefore the highest the operator reached on its way there, bursts included. A least-squares straight line
through the peaks gives the cost of one more LLMDeployment and the peak to expect at {EXTRAPOLATE_TO:,}; the
section after the table lists every size. The growth goes as far as the machine holds: a size that does not come up
in time ends it, and the section says why."""


@dataclass(frozen=True)
class Point:
    llmdeployments: int
    peak_mib: float  # VmHWM once settled at this size
    rss_mib: float  # VmRSS then
    grew_seconds: float | None = None  # the growth to this size: children and a current status; None: the fleet


@dataclass(frozen=True)
class Line:
    """Peak MiB as a straight line in the number of LLMDeployments."""

    intercept_mib: float
    mib_per_llmdeployment: float

    def at(self, llmdeployments: int) -> float:
        return self.intercept_mib + self.mib_per_llmdeployment * llmdeployments


def fit(points: Sequence[Point]) -> Line | None:
    """The least-squares line through the peaks; None without two fleet sizes to draw it through."""
    sizes = [float(p.llmdeployments) for p in points]
    if len(set(sizes)) < 2:
        return None
    mean_n, mean_mib = sum(sizes) / len(sizes), sum(p.peak_mib for p in points) / len(points)
    spread = sum((n - mean_n) ** 2 for n in sizes)
    slope = sum((n - mean_n) * (p.peak_mib - mean_mib) for n, p in zip(sizes, points)) / spread
    return Line(mean_mib - slope * mean_n, slope)


@dataclass(frozen=True)
class Slope:
    points: list[Point]
    failure: str | None = None  # the size the machine did not hold, and why

    def row(self) -> Row:
        line = fit(self.points)
        measured = ", ".join(f"{p.llmdeployments:,}" for p in self.points) or "none"
        figure = f"operator peak RSS extrapolated to {EXTRAPOLATE_TO:,} LLMDeployments (line through {measured})"
        if line is None:
            return Row(figure, f"error: fewer than two fleet sizes measured{self._why()}", passed=False)
        return Row(figure, f"{line.at(EXTRAPOLATE_TO):.0f} MiB ({1024 * line.mib_per_llmdeployment:.1f} KiB per "
                           f"LLMDeployment){self._why()}")

    def _why(self) -> str:
        return f"; {self.failure}" if self.failure else ""

    def table(self) -> str:
        """The page's section on memory by fleet size, Markdown."""
        lines = ["## Operator memory by fleet size", "",
                 "| LLMDeployments | peak RSS | RSS when settled | growth to this size | MiB per 1,000 more |",
                 "| --- | --- | --- | --- | --- |"]
        before: Point | None = None
        for point in self.points:
            grew = "-" if point.grew_seconds is None else f"{point.grew_seconds:.0f} s"
            step = "-" if before is None else (
                f"{1000 * (point.peak_mib - before.peak_mib) / (point.llmdeployments - before.llmdeployments):.1f}")
            lines.append(f"| {point.llmdeployments:,} | {point.peak_mib:.0f} MiB | {point.rss_mib:.0f} MiB | {grew} "
                         f"| {step} |")
            before = point
        line = fit(self.points)
        if line is not None:
            lines.append(f"| {EXTRAPOLATE_TO:,} (straight line) | {line.at(EXTRAPOLATE_TO):.0f} MiB | - | - "
                         f"| {1000 * line.mib_per_llmdeployment:.1f} |")
        if self.failure:
            lines += ["", f"Not measured further: {self.failure}."]
        return "\n".join(lines)


def _point(rig: Rig, count: int, grew_seconds: float | None) -> Point:
    point = Point(count, peak_rss_mib(rig.operator_pid), rss_mib(rig.operator_pid), grew_seconds)
    rig.out(f"  memory at {count:,}: peak {point.peak_mib:.0f} MiB, now {point.rss_mib:.0f} MiB")
    return point


async def measure(rig: Rig, tracker: Tracker, namespace: str, size: Size) -> Slope:
    """Grow the fleet the bursts built to each size of ``size.growth``, as far as the machine holds."""
    await fleet.settle(rig, tracker, size.fleet)
    points = [_point(rig, size.fleet, None)]
    for count in size.growth:
        try:
            grown = await burst.measure(rig, tracker, namespace, count, start=points[-1].llmdeployments)
            await fleet.settle(rig, tracker, count)
        except Exception as exc:  # noqa: BLE001 - how far the machine held is the result
            rig.out(f"  growth to {count:,} failed: {type(exc).__name__}: {exc}")
            return Slope(points, f"{count:,} failed: {type(exc).__name__}: {exc}"[:200])
        points.append(_point(rig, count, grown.seconds))
    return Slope(points)
