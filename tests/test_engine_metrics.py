"""Parsing real vLLM 0.32 /metrics bodies and turning two scrapes into status.engine."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllm_operator.engines.metrics import (
    Counter,
    EngineSample,
    EngineStats,
    Histogram,
    aggregate,
    counter_increase,
    histogram_increase,
    merge_buckets,
    parse_sample,
    quantile,
)

DATA = Path(__file__).parent / "data" / "vllm-0.32.0"
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
INF = math.inf


def load(name: str, at: float) -> EngineSample:
    return parse_sample((DATA / f"metrics-{name}.txt").read_text(), at)


# Both captures come from one server process (same _created stamps); the idle one was taken first.
def idle(at: float = 100.0) -> EngineSample:
    return load("idle-after-load", at)


def busy(at: float = 110.0) -> EngineSample:
    return load("busy", at)


def test_parse_busy_capture() -> None:
    sample = busy()
    assert sample.at == 110.0
    assert (sample.requests_running, sample.requests_waiting) == (40, 0)
    assert sample.kv_cache_usage == pytest.approx(0.004883408619216212)
    assert sample.prompt_tokens == Counter(620.0, 1795358792.9758763)
    assert sample.generation_tokens.value == 4280.0
    assert (sample.prefix_cache_queries.value, sample.prefix_cache_hits.value) == (620.0, 0.0)
    assert {reason: c.value for reason, c in sample.request_success.items()} == {
        "stop": 0.0, "length": 22.0, "abort": 0.0, "error": 0.0, "repetition": 0.0,
    }
    assert sample.request_success["error"].created == 1795358792.9760647
    assert sample.ttft.count == 62.0
    assert sample.ttft.buckets[0.04] == 55.0 and sample.ttft.buckets[0.25] == 62.0
    assert sample.ttft.created == 1795358792.976491
    assert sample.itl.count == 4218.0 and sample.itl.buckets[0.01] == 4178.0
    assert len(sample.itl.buckets) == 20 and max(sample.itl.buckets) == INF


def test_parse_idle_capture() -> None:
    sample = idle()
    assert (sample.requests_running, sample.requests_waiting, sample.kv_cache_usage) == (0, 0, 0.0)
    assert (sample.prompt_tokens.value, sample.generation_tokens.value) == (100.0, 1440.0)
    assert sample.prefix_cache_queries.value == 100.0
    assert sample.ttft.count == 22.0 and sample.itl.count == 1418.0
    assert sample.request_success["length"].value == 22.0
    # Same process as the busy capture: no restart between them.
    assert sample.prompt_tokens.created == busy().prompt_tokens.created


def test_parse_sums_data_parallel_engines_and_takes_fullest_kv_cache() -> None:
    text = "\n".join([
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_running{engine="1",model_name="m"} 4.0',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25',
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75',
        "# TYPE vllm:generation_tokens counter",
        'vllm:generation_tokens_total{engine="0",model_name="m"} 10.0',
        'vllm:generation_tokens_total{engine="1",model_name="m"} 5.0',
        'vllm:generation_tokens_created{engine="0",model_name="m"} 1000.0',
        'vllm:generation_tokens_created{engine="1",model_name="m"} 1002.0',
        "# TYPE vllm:inter_token_latency_seconds histogram",
        'vllm:inter_token_latency_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0',
        'vllm:inter_token_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0',
        'vllm:inter_token_latency_seconds_bucket{engine="1",le="0.1",model_name="m"} 3.0',
        'vllm:inter_token_latency_seconds_bucket{engine="1",le="+Inf",model_name="m"} 3.0',
        "",
    ])
    sample = parse_sample(text, 1.0)
    assert sample.requests_running == 7
    assert sample.requests_waiting == 0
    assert sample.kv_cache_usage == 0.75
    assert sample.generation_tokens == Counter(15.0, 1002.0)
    assert sample.itl.buckets == {0.1: 4.0, INF: 5.0}
    assert sample.ttft == Histogram() and sample.request_success == {}


@pytest.mark.parametrize("name", ["busy", "idle-after-load"])
def test_parse_agrees_with_prometheus_client_parser(name: str) -> None:
    text = (DATA / f"metrics-{name}.txt").read_text()
    sums: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, s.labels.get("le") or s.labels.get("finished_reason") or "")
            sums[key] = sums.get(key, 0.0) + s.value
    sample = parse_sample(text, 0.0)
    assert sample.requests_running == sums[("vllm:num_requests_running", "")]
    assert sample.kv_cache_usage == sums[("vllm:kv_cache_usage_perc", "")]
    assert sample.generation_tokens == Counter(
        sums[("vllm:generation_tokens_total", "")], sums[("vllm:generation_tokens_created", "")]
    )
    assert {r: c.value for r, c in sample.request_success.items()} == {
        key[1]: value for key, value in sums.items() if key[0] == "vllm:request_success_total"
    }
    assert sample.ttft.buckets == {
        float(key[1]): value for key, value in sums.items() if key[0] == "vllm:time_to_first_token_seconds_bucket"
    }
    assert sample.itl.created == sums[("vllm:inter_token_latency_seconds_created", "")]


def data_parallel_body() -> str:
    """/metrics of a Pod with two data-parallel engines, rendered by prometheus-client as vLLM's API server does.

    Names, label names and bucket bounds are those of the captures; engine "1" reports other values than "0".
    prometheus-client writes one label set's buckets, count and sum, then the next label set's, so the
    _bucket lines of a histogram are not all next to each other.
    """
    registry = prometheus_client.CollectorRegistry()
    labels = ("model_name", "engine")

    def gauge(name: str, *extra: str) -> prometheus_client.Gauge:
        return prometheus_client.Gauge(name, "g", (*labels, *extra), registry=registry)

    def counter(name: str, *extra: str) -> prometheus_client.Counter:
        return prometheus_client.Counter(name, "c", (*labels, *extra), registry=registry)

    def histogram(name: str, bounds: tuple[float, ...]) -> prometheus_client.Histogram:
        return prometheus_client.Histogram(name, "h", labels, buckets=bounds, registry=registry)

    running, waiting = gauge("vllm:num_requests_running"), gauge("vllm:num_requests_waiting")
    waiting_by_reason = gauge("vllm:num_requests_waiting_by_reason", "reason")  # starts like a wanted name
    kv_cache = gauge("vllm:kv_cache_usage_perc")
    counters = [
        counter(name) for name in (
            "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
            "vllm:prompt_tokens_cached",  # starts like a wanted name
        )
    ]
    success = counter("vllm:request_success", "finished_reason")
    ttft = histogram("vllm:time_to_first_token_seconds", (
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
        80.0, 160.0, 640.0, 2560.0,
    ))
    itl = histogram("vllm:inter_token_latency_seconds", (
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    ))
    for engine, scale in (("0", 1), ("1", 3)):
        series = {"model_name": "tiny", "engine": engine}
        running.labels(**series).set(2 * scale)
        waiting.labels(**series).set(scale - 1)
        waiting_by_reason.labels(**series, reason="capacity").set(50)
        kv_cache.labels(**series).set(0.1 * scale)
        for index, metric in enumerate(counters):
            metric.labels(**series).inc(100 * scale + index)
        for reason in ("stop", "length", "abort", "error", "repetition"):
            success.labels(**series, finished_reason=reason).inc(scale * len(reason))
        for seconds in (0.003, 0.03, 0.03 * scale, 0.3 * scale):
            ttft.labels(**series).observe(seconds)
        for seconds in (0.004, 0.02 * scale, 0.2 * scale):
            itl.labels(**series).observe(seconds)
    return prometheus_client.generate_latest(registry).decode()


def engine_after_engine(body: str) -> str:
    """Every sample line of engine "0", then every one of engine "1", as in two engines' bodies put one after
    the other; without HELP and TYPE lines, which would no longer head their series."""
    samples = [line for line in body.splitlines() if not line.startswith("#")]
    return "\n".join(sorted(samples, key=lambda line: 'engine="1"' in line)) + "\n"


def sample_by_prometheus_client(text: str, at: float) -> EngineSample:
    """What parse_sample must report, as read by prometheus-client's parser: engines added up (KV cache: the
    fullest), the latest `_created` stamp, counters by finished_reason and buckets by bound."""
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            series.setdefault(s.name, []).append((s.labels, s.value))

    def values(name: str, reason: str | None) -> list[float]:
        return [v for labels, v in series.get(name, []) if reason is None or labels["finished_reason"] == reason]

    def counter(base: str, reason: str | None = None) -> Counter:
        return Counter(sum(values(f"{base}_total", reason)), max(values(f"{base}_created", reason), default=None))

    def histogram(name: str) -> Histogram:
        buckets: dict[float, float] = {}
        for labels, value in series.get(f"{name}_bucket", []):
            buckets[float(labels["le"])] = buckets.get(float(labels["le"]), 0.0) + value
        return Histogram(buckets, max(values(f"{name}_created", None), default=None))

    return EngineSample(
        at=at,
        requests_running=round(sum(values("vllm:num_requests_running", None))),
        requests_waiting=round(sum(values("vllm:num_requests_waiting", None))),
        kv_cache_usage=max(values("vllm:kv_cache_usage_perc", None)),
        prompt_tokens=counter("vllm:prompt_tokens"),
        generation_tokens=counter("vllm:generation_tokens"),
        prefix_cache_queries=counter("vllm:prefix_cache_queries"),
        prefix_cache_hits=counter("vllm:prefix_cache_hits"),
        request_success={
            labels["finished_reason"]: counter("vllm:request_success", labels["finished_reason"])
            for labels, _ in series["vllm:request_success_total"]
        },
        ttft=histogram("vllm:time_to_first_token_seconds"),
        itl=histogram("vllm:inter_token_latency_seconds"),
    )


@pytest.mark.parametrize("arrange", [str, engine_after_engine], ids=["as-rendered", "engine-after-engine"])
def test_parse_reads_every_engine_of_a_prometheus_client_body(arrange: Callable[[str], str]) -> None:
    body = arrange(data_parallel_body())
    expected = sample_by_prometheus_client(body, 7.0)
    assert (expected.requests_running, expected.ttft.count, expected.itl.count) == (8, 8.0, 6.0)  # both engines
    assert parse_sample(body, 7.0) == expected


def test_parse_reads_escaped_label_values_and_labels_with_spaces() -> None:
    text = "\n".join([
        'vllm:num_requests_running{model_name="a \\"quoted\\" {name}",engine="0"} 2.0 1700000000000',
        'vllm:request_success_total{finished_reason="error",model_name="x\\\\y"} 3',
        'vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 4',
    ])
    sample = parse_sample(text, 0.0)
    assert sample.requests_running == 2
    assert sample.request_success["error"].value == 3.0
    assert sample.ttft.buckets == {INF: 4.0}


@pytest.mark.parametrize("text", [
    'vllm:num_requests_running{engine="0"}\n',
    'vllm:num_requests_running{engine="0" 1\n',
    'vllm:num_requests_running{engine="0"} many\n',
])
def test_parse_rejects_malformed_wanted_lines(text: str) -> None:
    with pytest.raises(ValueError):
        parse_sample(text, 0.0)


@pytest.mark.parametrize("text", ["", "# TYPE up gauge\nup 1\n"])
def test_parse_rejects_text_without_vllm_metrics(text: str) -> None:
    with pytest.raises(ValueError, match="is this a vLLM engine"):
        parse_sample(text, 0.0)


def test_idle_to_busy_rates_and_latencies_from_captures() -> None:
    stats = aggregate({"pod-a": idle(100.0)}, {"pod-a": busy(110.0)}, NOW)
    assert stats.model_dump(by_alias=True, exclude_none=True) == {
        "requestsRunning": 40,
        "requestsWaiting": 0,
        "kvCacheUsagePercent": 0.5,
        "promptTokensPerSecond": 52.0,  # (620 - 100) / 10 s
        "generationTokensPerSecond": 284.0,  # (4280 - 1440) / 10 s
        # 40 new first tokens: 34 in (0.02, 0.04], 6 in (0.1, 0.25].
        "ttftSecondsP50": 0.0318,  # 0.02 + 0.02 * 20 / 34
        "ttftSecondsP95": 0.2,  # 0.1 + 0.15 * 4 / 6
        # 2800 new gaps, 2760 of them at most 10 ms.
        "itlSecondsP50": 0.00507,  # 0.01 * 1400 / 2760
        "itlSecondsP95": 0.00964,  # 0.01 * 2660 / 2760
        "prefixCacheHitPercent": 0.0,
        "requestErrors": 0,
        "scrapedReplicas": 1,
        "lastScrapeTime": "2026-01-01T12:00:00Z",
    }


def test_busy_to_idle_counts_as_a_restart_and_never_goes_negative() -> None:
    # Counters that fall mean a new engine process: what it counted since its start is the increase.
    stats = aggregate({"pod-a": busy(100.0)}, {"pod-a": idle(110.0)}, NOW)
    assert stats.prompt_tokens_per_second == 10.0
    assert stats.generation_tokens_per_second == 144.0
    assert stats.requests_running == 0 and stats.request_errors == 0
    assert stats.ttft_seconds_p50 == pytest.approx(0.0295)  # the idle capture's own 22 observations
    assert stats.itl_seconds_p95 == 0.0095


def test_restart_seen_through_created_even_when_counters_grew() -> None:
    before = idle(100.0)
    restart = 1795359000.0  # a _created stamp later than the capture's
    restarted = replace(
        before,
        at=105.0,
        generation_tokens=Counter(2000.0, restart),
        request_success={**before.request_success, "error": Counter(3.0, restart)},
        itl=Histogram({0.01: 1500.0, INF: 1500.0}, restart),
    )
    stats = aggregate({"p": before}, {"p": restarted}, NOW)
    assert stats.generation_tokens_per_second == 400.0  # 2000 / 5 s, not (2000 - 1440) / 5 s
    assert stats.request_errors == 3
    assert stats.itl_seconds_p50 == 0.005


def test_counter_and_histogram_increase_edge_cases() -> None:
    assert counter_increase(Counter(10, 1.0), Counter(15, 1.0)) == 5
    assert counter_increase(Counter(10, 1.0), Counter(4, 1.0)) == 4
    assert counter_increase(Counter(10, None), Counter(10, None)) == 0
    grown = histogram_increase(Histogram({1.0: 2, INF: 3}, 1.0), Histogram({1.0: 5, INF: 9}, 1.0))
    assert grown == {1.0: 3, INF: 6}
    # One bucket falling is enough to know the engine restarted, even with _created switched off.
    fell = histogram_increase(Histogram({1.0: 2, INF: 3}), Histogram({1.0: 1, INF: 7}))
    assert fell == {1.0: 1, INF: 7}
    # A new bucket layout (another vLLM version) starts over as well.
    assert histogram_increase(Histogram({1.0: 2, INF: 3}), Histogram({2.0: 4, INF: 4})) == {2.0: 4, INF: 4}


def test_random_resets_never_give_negative_stats() -> None:
    base = idle(0.0)
    values = [100.0, 40.0, 41.0, 41.0, 500.0, 3.0, 0.0, 7.0]
    samples = [
        replace(
            base,
            at=float(i),
            prompt_tokens=Counter(v, base.prompt_tokens.created),
            prefix_cache_queries=Counter(v, 1.0),
            prefix_cache_hits=Counter(v / 2, 2.0 if i % 2 else 1.0),
            ttft=Histogram({0.1: v / 2, 1.0: v, INF: v}, base.ttft.created),
        )
        for i, v in enumerate(values)
    ]
    for before, after in zip(samples, samples[1:]):
        stats = aggregate({"p": before}, {"p": after}, NOW)
        assert stats.prompt_tokens_per_second >= 0
        assert stats.ttft_seconds_p50 is None or stats.ttft_seconds_p50 >= 0
        assert stats.prefix_cache_hit_percent is None or 0 <= stats.prefix_cache_hit_percent <= 100


def figures(stats: EngineStats) -> dict:
    return stats.model_dump(by_alias=True, exclude_none=True, exclude={"last_scrape_time"})


def test_idle_fleet_gives_identical_stats_every_time() -> None:
    first = {"a": idle(0.0), "b": idle(0.0)}
    second = {pod: replace(s, at=15.0) for pod, s in first.items()}
    third = {pod: replace(s, at=31.3) for pod, s in first.items()}
    one = aggregate(first, second, NOW)
    two = aggregate(second, third, NOW + timedelta(seconds=16))
    assert figures(one) == figures(two)
    assert one.last_scrape_time != two.last_scrape_time
    assert one.model_copy(update={"last_scrape_time": two.last_scrape_time}) == two
    assert figures(one) == {
        "requestsRunning": 0,
        "requestsWaiting": 0,
        "kvCacheUsagePercent": 0.0,
        "promptTokensPerSecond": 0.0,
        "generationTokensPerSecond": 0.0,
        "requestErrors": 0,
        "scrapedReplicas": 2,
    }


def test_small_noise_does_not_change_the_status() -> None:
    before = idle(0.0)
    rates = []
    for seconds in (10.0, 10.02, 10.03):
        after = replace(before, at=seconds, generation_tokens=Counter(1440.0 + 12345, before.generation_tokens.created))
        rates.append(aggregate({"p": before}, {"p": after}, NOW).generation_tokens_per_second)
    assert rates == [1230.0, 1230.0, 1230.0]  # 1234.5, 1232.0 and 1230.8 to 3 significant digits
    slow = replace(before, at=30.0, generation_tokens=Counter(1441.0, before.generation_tokens.created))
    assert aggregate({"p": before}, {"p": slow}, NOW).generation_tokens_per_second == 0.0  # under 0.05/s


def test_new_pods_give_gauges_but_no_rates_yet() -> None:
    stats = aggregate({}, {"a": busy(), "b": idle()}, NOW)
    assert (stats.requests_running, stats.kv_cache_usage_percent, stats.scraped_replicas) == (40, 0.5, 2)
    assert stats.generation_tokens_per_second == 0.0
    assert stats.ttft_seconds_p50 is None and stats.prefix_cache_hit_percent is None
    # The same pod scraped twice at the same instant has no interval either.
    assert aggregate({"a": busy(5.0)}, {"a": busy(5.0)}, NOW).prompt_tokens_per_second == 0.0


def test_fleet_sums_rates_and_merges_histograms() -> None:
    previous = {"a": idle(100.0), "b": idle(100.0), "gone": idle(100.0)}
    current = {"a": busy(110.0), "b": idle(110.0), "new": busy(110.0)}
    stats = aggregate(previous, current, NOW)
    assert stats.requests_running == 80 and stats.scraped_replicas == 3
    assert stats.generation_tokens_per_second == 284.0  # only "a" generated anything
    assert stats.ttft_seconds_p50 == 0.0318  # "b" adds no observations, so a's distribution stands


def test_prefix_cache_hit_percent_and_errors_over_the_interval() -> None:
    before = idle(0.0)
    after = replace(
        before,
        at=10.0,
        prefix_cache_queries=Counter(before.prefix_cache_queries.value + 300, before.prefix_cache_queries.created),
        prefix_cache_hits=Counter(100.0, before.prefix_cache_hits.created),
        request_success={
            **before.request_success,
            "error": Counter(2.0, before.request_success["error"].created),
            "abort": Counter(5.0, before.request_success["abort"].created),
            "length": Counter(99.0, before.request_success["length"].created),
        },
    )
    stats = aggregate({"p": before}, {"p": after}, NOW)
    assert stats.prefix_cache_hit_percent == 33.3
    assert stats.request_errors == 7


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {}, None),
        (0.5, {1.0: 0.0, INF: 0.0}, None),
        (0.5, {1.0: 4.0, 2.0: 4.0}, None),  # no +Inf bucket
        (0.5, {INF: 4.0}, None),  # nothing finite to answer with
        (0.5, {1.0: 4.0, INF: 4.0}, 0.5),  # first bucket starts at 0
        (0.5, {1.0: 0.0, 3.0: 4.0, INF: 4.0}, 2.0),
        (0.25, {1.0: 1.0, 2.0: 4.0, INF: 4.0}, 1.0),  # rank on a bucket boundary
        (1.0, {1.0: 1.0, 2.0: 4.0, INF: 4.0}, 2.0),
        (0.95, {1.0: 1.0, 2.0: 2.0, INF: 10.0}, 2.0),  # lands in +Inf: highest finite bound
        (0.5, {-1.0: 3.0, 0.0: 4.0, INF: 4.0}, -1.0),  # a non-positive first bound is returned as is
    ],
)
def test_quantile(q: float, buckets: dict[float, float], expected: float | None) -> None:
    assert quantile(q, buckets) == expected


def test_quantile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        quantile(0.0, {1.0: 1.0, INF: 1.0})


def test_merge_buckets_with_different_layouts_stays_cumulative() -> None:
    merged = merge_buckets([{1.0: 2.0, INF: 3.0}, {0.5: 1.0, 2.0: 4.0, INF: 4.0}, {}])
    assert merged == {0.5: 1.0, 1.0: 3.0, 2.0: 6.0, INF: 7.0}


def test_engine_stats_wire_format_and_descriptions() -> None:
    stats = aggregate({}, {"a": idle()}, datetime(2026, 3, 1, 13, 0, 5, tzinfo=timezone(timedelta(hours=1))))
    dumped = stats.model_dump(by_alias=True, exclude_none=True)
    assert dumped["lastScrapeTime"] == "2026-03-01T12:00:05Z"
    assert EngineStats.model_validate(dumped) == stats
    properties = EngineStats.model_json_schema(by_alias=True)["properties"]
    assert set(properties) == {
        "requestsRunning", "requestsWaiting", "kvCacheUsagePercent", "promptTokensPerSecond",
        "generationTokensPerSecond", "ttftSecondsP50", "ttftSecondsP95", "itlSecondsP50", "itlSecondsP95",
        "prefixCacheHitPercent", "requestErrors", "scrapedReplicas", "lastScrapeTime", "observedAt",
    }
    assert all(p.get("description") for p in properties.values())
