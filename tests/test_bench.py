"""The benchmark's pure parts: judging a burst against the control-plane floor, reading the sweep
histogram, judging status writes, Events and freshness, the memory slope, and the table's column of the
previous run's figures."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter

import pytest
from aiohttp import web
from prometheus_client import REGISTRY, generate_latest

from bench import __main__ as bench_main
from bench import autoscale, burst, engine_start, fleet, freshness, gateway, latency, memory, metrics, prefix
from bench.kube import BenchKube
from bench.report import Row, page, previous_results, text_table
from bench.rig import SCRAPE_INTERVAL
from bench.sizes import SIZES
from bench.tracker import Tracker
from vllm_operator import api, cli, observability  # noqa: F401 - observability registers the operator's metrics
from vllm_operator.kube import Credentials
from vllm_operator.reconcile.controller import STATUS_MIN_INTERVAL_SECONDS

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
        seconds=60.0, requests=Counter(), operator_events=0.0, operator_writes=0.0, status_writes=0.0, operator_cpu=1.0,
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


def test_bench_targets_follow_the_operators_default_status_min_interval() -> None:
    # The rig runs the operator without --status-min-interval: the targets must be those of its default.
    defaults = cli._parser().parse_args(["run"])
    assert defaults.status_min_interval == STATUS_MIN_INTERVAL_SECONDS
    assert fleet.STEADY_TARGET == 60 / defaults.status_min_interval
    assert freshness.STALENESS_TARGET == defaults.status_min_interval + SCRAPE_INTERVAL


def busy_window(status_writes: float, seconds: float = 60.0) -> fleet.Window:
    # The apiserver's count is the whole cluster's: the row must not judge by it.
    return fleet.Window(
        seconds=seconds, requests=Counter({("APPLY", api.PLURAL, "status"): 10 * status_writes}),
        operator_events=0.0, operator_writes=status_writes, status_writes=status_writes, operator_cpu=1.0, sweeps=12,
        sweep_seconds=12.0, sweep_buckets={}, scrape_failures=0.0)


def test_steady_row_allows_one_status_write_per_min_interval() -> None:
    assert fleet.steady_row(busy_window(2000), 1000).passed is True
    row = fleet.steady_row(busy_window(2100), 1000)
    assert row.passed is False
    assert row.result == "2.10"
    assert fleet.steady_row(busy_window(1000, seconds=30.0), 1000).passed is True


def test_rows_measured_while_another_client_wrote_the_fleet_fail_as_invalid() -> None:
    rows = [Row("steady", "1.00", "<= 2", True), Row("sweep", "fine")]
    assert fleet.another_writer(rows, changes_seen=500, written=520) == rows  # no-op writes change nothing
    marked = fleet.another_writer(rows, changes_seen=800, written=500)
    assert [row.passed for row in marked] == [False, False]
    assert marked[0].result == "1.00; invalid: 300 changes by another writer"


def test_events_row_allows_two_events_per_new_llmdeployment() -> None:
    row = fleet.events_row(Counter({"Created": 1000, "Ready": 1000}), 1000)
    assert row.passed is True
    assert row.result == "2.00 (Created 1.0, Ready 1.0)"
    assert fleet.events_row(Counter({"Created": 1000, "Ready": 1000, "Updated": 3}), 1000).passed is False


def test_a_switch_shows_once_the_load_leaves_the_dead_band_the_way_of_the_switch() -> None:
    assert freshness.shows_switch(0.0, 400.0, to_busy=True)  # from zero: always news
    assert not freshness.shows_switch(0.0, 0.0, to_busy=True)
    assert freshness.shows_switch(1000.0, 0.0, to_busy=False)
    assert freshness.shows_switch(1000.0, 700.0, to_busy=False)  # a partial scrape, beyond the band
    assert not freshness.shows_switch(1000.0, 900.0, to_busy=False)  # within the band: noise
    assert not freshness.shows_switch(1000.0, 1400.0, to_busy=False)  # moved, but the other way


def test_shown_load_reads_the_status_engine_figure() -> None:
    assert freshness.shown_load({"status": {"phase": "Ready"}}) is None
    assert freshness.shown_load({"status": {"engine": {"generationTokensPerSecond": 12}}}) == 12.0


def test_nearest_rank_percentiles() -> None:
    samples = [float(n) for n in range(20, 0, -1)]
    assert freshness.nearest_rank(samples, 0.95) == 19.0
    assert freshness.nearest_rank(samples, 0.5) == 10.0
    assert freshness.nearest_rank([3.0], 0.95) == 3.0
    assert freshness.nearest_rank([], 0.95) == float("inf")


def switch_after(delays: list[float], pending: int | None = None) -> freshness.Switch:
    return freshness.Switch(to_busy=False, at=100.0, pending=len(delays) if pending is None else pending,
                            shown_at={f"llmd-{i:04d}": 100.0 + delay for i, delay in enumerate(delays)})


def test_staleness_row_judges_the_p95_of_every_switch_against_the_interval_and_a_scrape() -> None:
    bound = freshness.STALENESS_TARGET
    # One sample in twenty beyond the bound is the 5 % a p95 leaves out.
    within = freshness.staleness_row([switch_after([5.0] * 10), switch_after([bound] * 9 + [bound + 20])])
    assert within.passed is True
    assert f"p95 {bound:.1f} s" in within.result
    beyond = freshness.staleness_row([switch_after([5.0] * 10), switch_after([bound + 1] * 2 + [5.0] * 8)])
    assert beyond.passed is False


def test_staleness_row_fails_when_a_status_never_showed_a_switch() -> None:
    row = freshness.staleness_row([switch_after([1.0] * 10, pending=11)])
    assert row.passed is False
    assert "1 never shown" in row.result
    assert freshness.staleness_row([]).passed is False


def test_a_switch_names_the_llmdeployments_it_showed_on_last() -> None:
    switch = switch_after([3.0, 1.0, 9.0, 2.0])
    assert switch.last_shown(2) == ["llmd-0000", "llmd-0002"]
    assert sorted(switch.delays) == [1.0, 2.0, 3.0, 9.0]


def test_phase_row_needs_every_change_within_a_scrape_interval_and_inside_the_min_interval() -> None:
    inside = [0.5] * 10
    assert freshness.PhaseChange(inside, [1.2] * 10, 0).row().passed is True
    assert freshness.PhaseChange(inside, [1.2] * 9 + [freshness.PHASE_TARGET + 0.1], 0).row().passed is False
    assert freshness.PhaseChange(inside, [1.2] * 9, 1).row().passed is False
    # Made after the interval had passed, it proves nothing about writes inside it.
    late = [0.5] * 9 + [STATUS_MIN_INTERVAL_SECONDS + 1]
    assert freshness.PhaseChange(late, [1.2] * 10, 0).row().passed is False


def test_memory_line_through_the_peaks_and_its_extrapolation() -> None:
    slope = memory.Slope([memory.Point(1000, 100.0, 90.0), memory.Point(2000, 150.0, 140.0, 60.0),
                          memory.Point(5000, 300.0, 280.0, 240.0)])
    line = memory.fit(slope.points)
    assert line is not None
    assert line.mib_per_llmdeployment == pytest.approx(0.05)
    assert line.at(10_000) == pytest.approx(550.0)
    row = slope.row()
    assert row.passed is None
    assert row.result == "550 MiB (51.2 KiB per LLMDeployment)"
    table = slope.table().splitlines()
    assert table[-1] == "| 10,000 (straight line) | 550 MiB | - | - | 50.0 |"
    assert "| 2,000 | 150 MiB | 140 MiB | 60 s | 50.0 |" in table


def test_memory_slope_says_how_far_the_machine_held() -> None:
    held = memory.Slope([memory.Point(1000, 100.0, 90.0)], "2,000 failed: TimeoutError: not reached")
    assert memory.fit(held.points) is None
    assert held.row().passed is False
    assert held.table().endswith("Not measured further: 2,000 failed: TimeoutError: not reached.")


def test_previous_results_read_only_the_first_table_of_a_page_with_sections() -> None:
    section = memory.Slope([memory.Point(1000, 100.0, 90.0), memory.Point(2000, 150.0, 140.0, 60.0)]).table()
    written = page(ROWS, {}, SIZES["full"], 5.0, ["**burst**: method."], [section])
    assert written.index(section) < written.index("## What each figure is")
    assert previous_results(written, SIZES["full"]) == {row.figure: row.result for row in ROWS}


def test_the_largest_fleet_includes_the_memory_growth_only_when_measured() -> None:
    assert SIZES["full"].largest(memory=True) == 5000
    assert SIZES["full"].largest(memory=False) == SIZES["full"].fleet


def test_a_watch_from_a_version_the_apiserver_no_longer_holds_lists_again() -> None:
    lists = [["a"], ["a", "b"]]
    watches = [[{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}],
               [{"type": "ADDED", "object": {"metadata": {"name": "c", "resourceVersion": "7"}}}]]
    done = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        if "watch" not in request.query:
            names = lists.pop(0)
            return web.json_response({"metadata": {"resourceVersion": str(len(names))},
                                      "items": [{"metadata": {"name": name}} for name in names]})
        response = web.StreamResponse()
        await response.prepare(request)
        for event in watches.pop(0) if watches else []:
            await response.write(json.dumps(event).encode() + b"\n")
        if not watches and not lists:
            await done.wait()  # the last watch stays open, as the apiserver's do
        return response

    async def body() -> None:
        app = web.Application()
        app.router.add_route("GET", "/{path:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        kube = BenchKube(Credentials(f"http://127.0.0.1:{runner.addresses[0][1]}", False))
        seen: list[tuple[str, str]] = []
        try:
            task = await kube.watch("/api/v1/namespaces/x/pods", lambda kind, obj: seen.append(
                (kind, obj["metadata"]["name"])))
            for _ in range(100):
                if len(seen) == 4:
                    break
                await asyncio.sleep(0.05)
            assert not task.done()
            task.cancel()
        finally:
            done.set()
            await kube.close()
            await runner.cleanup()
        assert seen == [("ADDED", "a"), ("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c")]

    asyncio.run(body())


def test_the_operator_serves_every_namespace_the_selected_measurements_use_and_no_other() -> None:
    small = SIZES["small"]
    assert bench_main.namespaces(small, {"fleet"}) == [burst.namespace_for(small.fleet)]
    assert bench_main.namespaces(small, set(bench_main.MEASUREMENTS)) == [
        latency.NAMESPACE, *(burst.namespace_for(count) for count in small.bursts), autoscale.NAMESPACE,
        engine_start.NAMESPACE, engine_start.HUB_NAMESPACE, gateway.NAMESPACE, prefix.NAMESPACE]
    assert bench_main.namespaces(small, {"gateway"}) == [gateway.NAMESPACE]
    assert bench_main.namespaces(small, {"prefix"}) == [prefix.NAMESPACE]


def test_autoscaler_rows_count_no_scale_change_in_a_steady_or_oscillating_hour() -> None:
    rows = autoscale.scale_changes()
    assert [row.result for row in rows] == ["0", "0"] and all(row.passed for row in rows)


def test_autoscaler_rows_count_the_changes_after_settling_only() -> None:
    # Load that swings every 10 minutes, beyond the 300 s scale-down window, does change the count.
    assert autoscale._changes_in_an_hour(1, lambda t: {"requests_running": 40 if t % 1200 < 600 else 4}) > 0
    assert autoscale._changes_in_an_hour(1, lambda t: {"requests_running": 40}) == 0


def test_autoscaler_decision_row_judges_a_sweeps_cpu_against_the_sweep_target() -> None:
    row = autoscale.decision_cpu(SIZES["small"])
    assert row.passed and f"{SIZES['small'].fleet:,} autoscaled" in row.figure


def test_new_versions_count_changes_only_not_the_same_version_listed_again() -> None:
    tracker = Tracker(kinds=())

    def llmd(name: str, version: str) -> dict[str, object]:
        return {"metadata": {"name": name, "resourceVersion": version, "generation": 1}}

    tracker._resource("ADDED", llmd("a", "1"))
    with fleet.new_versions(tracker) as seen:
        tracker._resource("ADDED", llmd("a", "1"))  # a list after the watch fell behind
        tracker._resource("MODIFIED", llmd("a", "2"))
        tracker._resource("ADDED", llmd("b", "3"))
        tracker._resource("MODIFIED", llmd("b", "3"))
    tracker._resource("MODIFIED", llmd("a", "4"))
    assert seen == Counter({"a": 1, "b": 1})
    assert tracker.listeners == []


def paired(direct_ms: list[float], gateway_ms: list[float]) -> gateway.Paired:
    return gateway.Paired([ms / 1000 for ms in direct_ms], [ms / 1000 for ms in gateway_ms])


def test_gateway_added_latency_is_the_difference_of_the_two_paths_percentiles() -> None:
    # The p99 of 100 samples is the 99th smallest, whichever request it was.
    samples = paired([1.0] * 98 + [3.0, 9.0], [1.5] * 98 + [4.0, 20.0])
    assert samples.added_ms(0.5) == pytest.approx(0.5)
    assert samples.added_ms(0.99) == pytest.approx(1.0)
    row = gateway.latency_row(samples)
    assert row.passed is True
    assert row.result.startswith("+0.50 ms p50, +1.00 ms p99 (gateway 1.50 / 4.00 ms, direct 1.00 / 3.00 ms)")


def test_gateway_latency_and_first_byte_rows_judge_their_own_targets_on_the_p50() -> None:
    slow = paired([1.0] * 10, [2.5] * 10)  # 1.5 ms added: beyond the latency target, within the stream's
    assert gateway.latency_row(slow).passed is False
    assert gateway.ttfb_row(slow).passed is True
    assert gateway.ttfb_row(paired([1.0] * 10, [3.5] * 10)).passed is False
    # A p99 far beyond does not fail a row whose target is on the p50.
    assert gateway.latency_row(paired([1.0] * 100, [1.5] * 98 + [50.0] * 2)).passed is True


def test_gateway_rate_is_judged_per_second_of_the_gateways_own_cpu() -> None:
    # 10,000 requests in 5 s with the gateway busy 4 s: 2,500 a core-second, though 2,000/s were measured.
    row = gateway.rate_row(gateway.Rate(30_000, 5.0), gateway.Rate(10_000, 5.0), gateway_cpu=4.0)
    assert row.passed is True
    assert row.result == ("2,500 per CPU-second (400 µs each); measured 2,000/s with the gateway at 80% of its core, "
                          "6,000/s straight to the engine")
    assert gateway.rate_row(gateway.Rate(30_000, 5.0), gateway.Rate(9_000, 5.0), gateway_cpu=5.0).passed is False
    assert gateway.rate_row(gateway.Rate(30_000, 5.0), gateway.Rate(0, 5.0), gateway_cpu=0.0).passed is False
