"""The status write policy and the fleet's write budget, on plain values."""

from __future__ import annotations

from vllm_operator.reconcile.writes import Change, WriteBudget, classify, figures_moved

ENGINE = {"requestsRunning": 40, "requestsWaiting": 10, "kvCacheUsagePercent": 50.0,
          "promptTokensPerSecond": 800.0, "generationTokensPerSecond": 1200.0, "ttftSecondsP50": 0.2,
          "requestErrors": 0, "scrapedReplicas": 2, "lastScrapeTime": "2026-12-01T00:00:00Z"}
STATUS = {"phase": "Ready", "readyReplicas": 2, "conditions": [{"type": "Ready", "status": "True"}], "engine": ENGINE}


def moved(**figures: object) -> dict:
    return {**STATUS, "engine": {**ENGINE, **figures, "lastScrapeTime": "2026-12-01T00:00:05Z"}}


def test_noise_below_the_band_writes_nothing() -> None:
    assert classify(STATUS, moved(requestsRunning=41, generationTokensPerSecond=1250.0, kvCacheUsagePercent=52.0)) \
        is Change.NONE


def test_a_meaningful_move_is_a_paced_figures_write() -> None:
    assert classify(STATUS, moved(requestsRunning=60)) is Change.FIGURES
    assert classify(STATUS, moved(ttftSecondsP50=0.5)) is Change.FIGURES


def test_going_idle_or_busy_always_counts() -> None:
    assert figures_moved({"requestsWaiting": 1}, {"requestsWaiting": 0})
    assert figures_moved({"ttftSecondsP50": 0.2}, {})  # no request started since the last scrape


def test_the_band_is_measured_from_the_value_last_written() -> None:
    # Each step is noise, but the sum of them is not: the dead band follows the written value, not the last scrape.
    written = STATUS
    steps = [moved(generationTokensPerSecond=1200.0 + 60 * i) for i in range(1, 6)]
    assert classify(written, steps[0]) is Change.NONE
    assert classify(written, steps[-1]) is Change.FIGURES


def test_what_people_act_on_is_written_at_once() -> None:
    assert classify(STATUS, {**moved(), "phase": "Degraded"}) is Change.NOW
    assert classify(STATUS, moved(scrapedReplicas=1)) is Change.NOW
    assert classify(STATUS, {k: v for k, v in STATUS.items() if k != "engine"}) is Change.NOW


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_defers_then_serves_every_deferred_key_in_order() -> None:
    clock = Clock()
    budget = WriteBudget(per_second=2, burst=2, clock=clock)
    assert budget.request("a") == 0 and budget.request("b") == 0
    waits = {key: budget.request(key) for key in ("c", "d", "e")}
    assert all(w > 0 for w in waits.values()) and waits["c"] < waits["d"] < waits["e"]
    assert budget.waiting == 3
    served: list[str] = []
    for _ in range(20):
        clock.now += 0.25
        for key in ("e", "d", "c"):  # asking out of order does not jump the line
            if key not in served and budget.request(key) == 0:
                served.append(key)
    assert served == ["c", "d", "e"] and budget.waiting == 0


def test_a_key_that_no_longer_needs_a_write_leaves_the_line() -> None:
    clock = Clock()
    budget = WriteBudget(per_second=1, burst=1, clock=clock)
    assert budget.request("a") == 0
    budget.request("b")
    budget.request("c")
    budget.cancel("b")
    clock.now += 1
    assert budget.request("c") == 0


def test_a_key_that_stops_asking_does_not_hold_the_line() -> None:
    """A deferred key whose reconcile does not come back at its turn (it failed and backs off for minutes, say)
    loses its place once its turn is well past, instead of holding every key behind it."""
    clock = Clock()
    budget = WriteBudget(per_second=1, burst=1, clock=clock)
    assert budget.request("a") == 0
    stuck = budget.request("b")  # b is told when its turn comes, then never asks again
    waiting = budget.request("c")
    clock.now += waiting
    assert budget.request("c") > 0  # b's turn is not past by much: c still waits behind it
    clock.now += stuck + WriteBudget.GRACE_SECONDS
    assert budget.request("c") == 0 and budget.waiting == 0


def test_download_progress_is_a_paced_figures_write_and_its_phase_is_written_at_once() -> None:
    cache = {"phase": "Downloading", "job": "j", "bytesTotal": 100, "bytesDone": 10, "percent": 10.0,
             "bytesPerSecond": 5.0, "etaSeconds": 18.0, "message": "downloading"}
    base = {"phase": "Downloading", "cache": cache}
    progressed = {**cache, "bytesDone": 11, "percent": 11.0, "etaSeconds": 17.8}
    assert classify(base, {**base, "cache": progressed}) is Change.FIGURES
    assert classify(base, dict(base)) is Change.NONE
    for news in ({"phase": "Ready"}, {"revision": "abc"}, {"message": "downloading, attempt 2"}):
        assert classify(base, {**base, "cache": {**progressed, **news}}) is Change.NOW, news
    assert classify({"phase": "Pending"}, base) is Change.NOW
