"""The benchmark's pure parts: judging a burst against the control-plane floor, reading the sweep
histogram, and the table's column of the previous run's figures."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from prometheus_client import REGISTRY, generate_latest

from bench import burst, fleet, metrics
from bench.report import Row, page, previous_results, text_table
from bench.sizes import SIZES
from vllm_operator import observability  # noqa: F401 - registers the operator's metrics in REGISTRY

FLOOR = burst.Floor(count=1000, seconds=100.0)


def test_burst_of_target_size_passes_within_its_ratio_to_the_floor() -> None:
    row = burst.Burst(count=1000, seconds=119.0, cpu=30.0).row(FLOOR)
    assert row.passed is True
    assert "1.19x floor" in row.result


def test_burst_of_target_size_fails_beyond_its_ratio_to_the_floor() -> None:
    row = burst.Burst(count=1000, seconds=121.0, cpu=30.0).row(FLOOR)
    assert row.passed is False
    assert "1.21x floor" in row.result


def test_burst_without_a_floor_of_its_size_is_shown_unjudged() -> None:
    assert burst.Burst(count=1000, seconds=10.0, cpu=3.0).row(None).passed is None
    smaller = burst.Burst(count=100, seconds=10.0, cpu=3.0).row(FLOOR)
    assert smaller.passed is None
    assert "floor" not in smaller.result


def test_a_smaller_fleet_shows_its_ratio_without_a_verdict() -> None:
    row = burst.Burst(count=50, seconds=6.0, cpu=1.0).row(burst.Floor(count=50, seconds=3.0))
    assert row.passed is None
    assert "2.00x floor" in row.result


def test_observations_over_a_bucket_bound() -> None:
    cumulative = {0.5: 3.0, 2.0: 9.0, 5.0: 12.0, float("inf"): 12.0}
    assert metrics.over(cumulative, 12.0, 2.0) == 3.0
    assert metrics.over(cumulative, 12.0, 5.0) == 0.0
    with pytest.raises(ValueError, match="le=1"):
        metrics.over(cumulative, 12.0, 1.0)


def test_the_operator_sweep_histogram_has_a_bucket_at_the_target() -> None:
    exposition = generate_latest(REGISTRY).decode()
    assert fleet.SWEEP_TARGET_SECONDS in metrics.buckets(exposition, fleet.SWEEP_METRIC)


def idle_window(sweeps: float, within_target: float, failures: float = 0.0) -> fleet.Window:
    return fleet.Window(
        seconds=60.0, requests=Counter(), operator_events=0.0, operator_writes=0.0, operator_cpu=1.0,
        sweeps=sweeps, sweep_seconds=1.5 * sweeps,
        sweep_buckets={1.0: 0.0, fleet.SWEEP_TARGET_SECONDS: within_target, 5.0: sweeps, float("inf"): sweeps},
        scrape_failures=failures)


def test_sweep_row_passes_when_every_sweep_is_within_the_target() -> None:
    row = fleet.sweep_row(idle_window(12, 12), 1000)
    assert row.passed is True
    assert "0 of 12 sweeps over 2 s" in row.result


def test_sweep_row_fails_on_a_single_slow_sweep_whatever_the_mean() -> None:
    row = fleet.sweep_row(idle_window(12, 11), 1000)
    assert row.passed is False
    assert "1 of 12 sweeps over 2 s" in row.result


def test_sweep_row_fails_without_sweeps_or_with_failed_scrapes() -> None:
    assert fleet.sweep_row(idle_window(0, 0), 1000).passed is False
    assert fleet.sweep_row(idle_window(12, 12, failures=2), 1000).passed is False


ROWS = [Row("burst of 1,000: children + current status", "100.0 s", "<= 1.2x floor", True),
        Row("figure with a | in it", "a | b")]


def test_previous_results_read_back_from_the_page_of_the_same_size() -> None:
    written = page(ROWS, {}, SIZES["full"], 5.0, ["**burst**: method."])
    assert previous_results(written, SIZES["full"]) == {row.figure: row.result for row in ROWS}
    assert previous_results(written, SIZES["small"]) == {}


def test_previous_results_read_from_the_page_before_the_previous_column() -> None:
    old = """# Benchmarks

Last run: 2026-11-23, 2 cores, size
`full`, operator scrape interval 5 s.

| figure | result | target | verdict |
| --- | --- | --- | --- |
| burst of 1,000: children + current status; operator CPU | 117.9 s; CPU 32.9 s | <= 20 s for 1,000 | FAIL |
"""
    assert previous_results(old, SIZES["full"]) == {
        "burst of 1,000: children + current status; operator CPU": "117.9 s; CPU 32.9 s"}


def test_table_shows_the_previous_result_beside_the_new_one() -> None:
    table = text_table(ROWS, {ROWS[0].figure: "117.9 s"})
    header, _rule, first, second = (re.split(r"\s{2,}", line) for line in table.splitlines())
    assert header == ["figure", "previous", "result", "target", "verdict"]
    assert first == [ROWS[0].figure, "117.9 s", "100.0 s", "<= 1.2x floor", "pass"]
    assert second[1:3] == ["-", "a | b"]
