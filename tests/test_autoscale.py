"""Autoscaling decisions, driven in simulated time: a Deployment that follows spec.replicas, engines that
serve some seconds after their Pod exists, a scrape every 15 s, and a load the test sets."""

from __future__ import annotations

import random
from typing import Any

import pytest

from vllm_operator.api import AutoscalingSpec
from vllm_operator.autoscale.decide import WINDOW_SECONDS, Autoscaler, Decision, step_size
from vllm_operator.autoscale.simulate import SCRAPE_SECONDS, Load, Simulation, sample

MINUTE = 60.0


def autoscaling(**fields: Any) -> AutoscalingSpec:
    return AutoscalingSpec.model_validate({"maxReplicas": 8, **fields})


def steady(**load: Any) -> Load:
    return lambda _t: load


def step_at(start: float, **load: Any) -> Load:
    return lambda t: load if t >= start else {}


@pytest.mark.parametrize(("targets", "expected"), [
    (None, 3),  # the default target, 16 requests per replica: ceil(40 / 16)
    ([{"metric": "waitingRequests", "value": 4}], 10),
])
def test_a_step_to_40_waiting_reaches_the_count_within_two_windows(targets: Any, expected: int) -> None:
    simulation = Simulation(autoscaling(maxReplicas=16, **({"targets": targets} if targets else {})), replicas=1)
    simulation.run(5 * MINUTE, step_at(MINUTE, requests_waiting=40))
    assert simulation.first_time(expected) <= MINUTE + 2 * WINDOW_SECONDS
    assert simulation.replicas == expected
    assert max(count for _t, count in simulation.counts) == expected, "overshot, then came back"
    assert "waiting" in simulation.decisions[-1].reason or "requestsPerReplica" in simulation.decisions[-1].reason


def test_steady_noisy_load_changes_nothing() -> None:
    # 24..48 requests a scrape around 3 replicas' worth: windows ask for 2 now and then, never for 4.
    noise = random.Random(15)
    simulation = Simulation(autoscaling(), replicas=3)
    simulation.run(30 * MINUTE, lambda _t: {"requests_running": noise.randint(24, 48)})
    assert simulation.changes == []
    assert any(d.reason.endswith("asked for up to 3") for d in simulation.decisions), "the load never asked for 2"


def test_load_that_dips_within_the_scale_down_window_changes_nothing() -> None:
    simulation = Simulation(autoscaling(), replicas=3)
    simulation.run(60 * MINUTE, lambda t: {"requests_running": 40 if t % (4 * MINUTE) < 2 * MINUTE else 4})
    assert simulation.changes == []


def test_bursts_within_the_scale_up_window_change_nothing() -> None:
    simulation = Simulation(autoscaling(behavior={"scaleUpStabilizationSeconds": 120}), replicas=1)
    simulation.run(60 * MINUTE, lambda t: {"requests_waiting": 40 if t % (5 * MINUTE) < MINUTE else 2})
    assert simulation.changes == []


def test_scale_down_waits_for_the_delay_after_a_scale_up() -> None:
    spec = autoscaling(behavior={"scaleDownStabilizationSeconds": 0, "scaleDownDelaySeconds": 300})
    simulation = Simulation(spec, replicas=1)
    simulation.run(10 * MINUTE, lambda t: {"requests_running": 40} if t < 100 else {})
    ups = [at for at, before, after in simulation.changes if after > before]
    downs = [at for at, before, after in simulation.changes if after < before]
    assert ups and downs
    assert min(downs) >= max(ups) + 300
    assert min(downs) <= max(ups) + 300 + SCRAPE_SECONDS
    assert any("no scale-down within 300 s of the last scale-up" in d.reason for d in simulation.decisions)


def test_without_the_delay_scale_down_follows_the_window() -> None:
    spec = autoscaling(behavior={"scaleDownStabilizationSeconds": 0, "scaleDownDelaySeconds": 0})
    simulation = Simulation(spec, replicas=1)
    simulation.run(5 * MINUTE, lambda t: {"requests_running": 40} if t < 100 else {})
    assert simulation.replicas == 1 and len(simulation.changes) >= 2


def test_idle_reaches_zero_after_scale_to_zero_seconds_and_stays() -> None:
    spec = autoscaling(minReplicas=0, behavior={"scaleToZeroAfterSeconds": 600})
    simulation = Simulation(spec, replicas=1)
    simulation.run(30 * MINUTE, lambda t: {"requests_running": 3} if t < 100 else {})
    last_busy = max(at for at, _count in simulation.counts if at < 100)
    zero_at = simulation.first_time(0)
    assert last_busy + 600 <= zero_at <= last_busy + 600 + SCRAPE_SECONDS
    assert all(count == 1 for at, count in simulation.counts if at < zero_at)
    assert all(count == 0 for at, count in simulation.counts if at >= zero_at)
    assert "no replica is serving" in simulation.decisions[-1].reason


def test_a_wake_up_from_zero_is_kept_until_a_replica_serves() -> None:
    spec = autoscaling(minReplicas=0, behavior={"scaleToZeroAfterSeconds": 60, "scaleDownStabilizationSeconds": 0})
    scaler = Autoscaler(spec)
    for at in range(0, 120, 15):  # idle long enough: the last replica goes
        scaler.observe(sample(at, 1))
    assert scaler.decide(1, 1, 120).desired == 0
    # Woken by hand before any sweep saw the replica gone: the idle samples must not send it back to zero.
    scaler.wake()
    assert scaler.decide(1, 0, 121).desired == 1
    scaler.observe(sample(150, 0))  # the new replica is loading
    assert scaler.decide(1, 1, 150).desired == 1
    for at in range(165, 225, 15):  # serving, idle, but not yet for scaleToZeroAfterSeconds
        scaler.observe(sample(at, 1))
        assert scaler.decide(1, 1, at).desired == 1


def test_scale_to_zero_counts_idleness_only_while_watching() -> None:
    spec = autoscaling(minReplicas=0, behavior={"scaleToZeroAfterSeconds": 600, "scaleDownStabilizationSeconds": 0})
    scaler = Autoscaler(spec)
    scaler.observe(sample(0))
    scaler.observe(sample(500, ready=0))  # no replica answered: requests may have come and gone unseen
    scaler.observe(sample(515))
    assert scaler.decide(1, 1, 700).desired == 1
    scaler.observe(sample(1115))
    assert scaler.decide(1, 1, 1115).desired == 0


def test_no_request_asks_for_no_replica_whatever_else_the_engines_report() -> None:
    # KV blocks an engine still counts, or the tail of a token rate, must not hold the last replica.
    spec = autoscaling(minReplicas=0, targets=[{"metric": "kvCacheUsagePercent", "value": 80},
                                               {"metric": "generationTokensPerSecond", "value": 500}],
                       behavior={"scaleToZeroAfterSeconds": 600})
    simulation = Simulation(spec, replicas=1)
    simulation.run(20 * MINUTE, steady(kv_cache_usage_percent=0.5, generation_tokens_per_second=1.0))
    assert simulation.replicas == 0


def test_replicas_still_loading_are_capacity_that_is_coming() -> None:
    # New engines take 10 minutes to load: the one serving replica keeps reporting the whole burst.
    simulation = Simulation(autoscaling(maxReplicas=16), replicas=1, load_seconds=10 * MINUTE)
    simulation.run(8 * MINUTE, steady(requests_waiting=40))
    assert simulation.replicas == 3
    assert [after for _t, _before, after in simulation.changes] == [2, 3]


def test_replicas_that_cannot_be_created_do_not_compound() -> None:
    # A quota lets 2 Pods exist: spec.replicas goes one step past them and waits there.
    spec = autoscaling(maxReplicas=100, targets=[{"metric": "waitingRequests", "value": 1}])
    simulation = Simulation(spec, replicas=1, quota=2)
    simulation.run(10 * MINUTE, steady(requests_waiting=40))
    assert simulation.replicas == 4
    assert simulation.decisions[-1].reason.endswith("keeping 4 while only 2 exist")


def test_the_largest_target_wins() -> None:
    spec = autoscaling(targets=[{"metric": "requestsPerReplica", "value": 16},
                                {"metric": "kvCacheUsagePercent", "value": 50}])
    kv_wins = Autoscaler(spec)
    kv_wins.observe(sample(0, ready=2, requests_running=40, kv_cache_usage_percent=90.0))
    decision = kv_wins.decide(2, 2, 0)
    assert decision.desired == 4  # 90% on each of 2 replicas at 50% each: ceil(180 / 50); requests ask for 3
    assert decision.reason.startswith("kvCacheUsagePercent 90.0 (the fullest of 2 replicas serving) asks for 4")
    assert decision.metrics == {"requestsPerReplica": 40.0, "kvCacheUsagePercent": 90.0}

    requests_win = Autoscaler(spec)
    requests_win.observe(sample(0, ready=2, requests_running=40, kv_cache_usage_percent=40.0))
    decision = requests_win.decide(2, 2, 0)
    assert (decision.desired, decision.reason) == (
        3, "requestsPerReplica 40.0 asks for 3 replicas at 16 per replica: 2 -> 3")


def test_window_averages_scrapes() -> None:
    scaler = Autoscaler(autoscaling())
    scaler.observe(sample(0, requests_waiting=0))
    scaler.observe(sample(15, requests_waiting=40))
    decision = scaler.decide(1, 1, 15)
    assert decision.metrics == {"requestsPerReplica": 20.0}
    assert decision.desired == 2


def test_a_long_scrape_interval_still_averages_two_scrapes() -> None:
    scaler = Autoscaler(autoscaling())
    scaler.observe(sample(0, requests_waiting=0))
    scaler.observe(sample(4 * WINDOW_SECONDS, requests_waiting=40))
    assert scaler.decide(1, 1, 4 * WINDOW_SECONDS).metrics == {"requestsPerReplica": 20.0}


def test_no_samples_keep_the_count() -> None:
    scaler = Autoscaler(autoscaling(minReplicas=0, behavior={"scaleToZeroAfterSeconds": 60}))
    assert scaler.decide(0, 0, 0) == Decision(0, "no replica is serving, so there is no load to measure: keeping 0", {}, 0,
                                              measured=False)
    scaler.observe(sample(10, ready=0))
    kept = scaler.decide(3, 3, 10)
    assert kept.desired == 3 and not kept.measured, "a scrape that found no serving replica measured no load"


def test_a_restart_does_not_scale_down_on_one_window() -> None:
    scaler = Autoscaler(autoscaling())
    scaler.observe(sample(0, requests_running=1))
    assert scaler.decide(3, 3, 0).desired == 3
    scaler.observe(sample(301, requests_running=1))
    assert scaler.decide(3, 3, 301).desired == 2


def test_counts_outside_the_bounds_move_to_them_at_once() -> None:
    scaler = Autoscaler(autoscaling(minReplicas=2, maxReplicas=4))
    decision = scaler.decide(9, 9, 0)
    assert (decision.desired, decision.reason) == (
        4, "spec.replicas 9 is outside minReplicas 2 and maxReplicas 4: 9 -> 4")
    assert scaler.decide(0, 0, 1).desired == 2


def test_update_spec_applies_to_the_next_decision() -> None:
    scaler = Autoscaler(autoscaling())
    scaler.observe(sample(0, requests_running=40))
    assert scaler.decide(3, 3, 0).desired == 3
    scaler.update_spec(autoscaling(targets=[{"metric": "requestsPerReplica", "value": 8}]))
    assert scaler.decide(3, 3, 1).desired == 5


@pytest.mark.parametrize(("step", "existing", "expected"), [
    ("100%", 0, 1), ("100%", 3, 3), ("50%", 3, 2), ("10%", 3, 1), (4, 3, 4), (1, 0, 1),
])
def test_step_size(step: int | str, existing: int, expected: int) -> None:
    assert step_size(step, existing) == expected
