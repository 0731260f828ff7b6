"""The scraper and the engine monitor against a real HTTP server on 127.0.0.1 that answers like vLLM 0.32
engines, and the rule that turns failed scrapes into unhealthy replicas."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from vllm_operator.reconcile.controller import Key
from vllm_operator.engines.metrics import EngineStats, parse_sample
from vllm_operator.engines.monitor import EngineMonitor
from vllm_operator.engines.scrape import Failure, MetricsScraper, ScrapeResult, ScrapeState, judge_health

DATA = Path(__file__).parent / "data" / "vllm-0.32.0"
BUSY = (DATA / "metrics-busy.txt").read_text()
IDLE = (DATA / "metrics-idle-after-load.txt").read_text()
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


class FakeEngines:
    """One server, many engines: ``/<engine>/metrics`` and ``/<engine>/health``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests = 0
        self.authorization: list[str | None] = []
        self.client_ports: set[int] = set()
        # Engines whose next /metrics answers 500, once.
        self.fail_next: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        engine, path = request.match_info["engine"], request.match_info["path"]
        self.requests += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self._answer(request, engine, path)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, engine: str, path: str) -> web.Response:
        self.authorization.append(request.headers.get("Authorization"))
        self.client_ports.add(request.transport.get_extra_info("peername")[1] if request.transport else 0)
        if engine == "hang":
            await self.release.wait()
        if engine.startswith("slow"):
            await asyncio.sleep(0.05)
        if path == "health":
            return web.Response(status=503 if engine == "dead" else 200)
        if engine == "html":
            return web.Response(text="<html><body>Welcome</body></html>", content_type="text/html")
        if engine == "broken" or engine in self.fail_next:
            self.fail_next.discard(engine)
            return web.Response(status=500, text="Internal Server Error\n\n  traceback ...")
        if engine == "nometrics":
            raise web.HTTPNotFound()
        return web.Response(text=IDLE if engine == "idle" else BUSY, content_type="text/plain")


@asynccontextmanager
async def engines() -> AsyncIterator[tuple[FakeEngines, str]]:
    fake = FakeEngines()
    app = web.Application()
    app.router.add_get("/{engine}/{path:metrics|health}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        fake.release.set()
        await runner.cleanup()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def test_scrapes_real_bodies_into_samples() -> None:
    async def body() -> None:
        async with engines() as (_, url):
            scraper = MetricsScraper(clock=lambda: 42.0)
            try:
                results = await scraper.scrape({"pod-a": f"{url}/busy", "pod-b": f"{url}/idle/"})
            finally:
                await scraper.close()
        assert set(results) == {"pod-a", "pod-b"}
        assert results["pod-a"].error is None and results["pod-a"].failure is None
        assert results["pod-a"].sample == parse_sample(BUSY, 42.0)
        sample_b = results["pod-b"].sample
        assert sample_b is not None and sample_b.requests_running == 0

    run(body)


def test_dead_engine_core_is_reported_from_health() -> None:
    async def body() -> None:
        async with engines() as (_, url):
            scraper = MetricsScraper()
            results = await scraper.scrape({"pod-a": f"{url}/dead"})
            await scraper.close()
        assert results["pod-a"].sample is None
        assert results["pod-a"].error == "GET /health answered 503: engine core is dead"
        assert results["pod-a"].failure is Failure.DEAD

    run(body)


def test_unusable_metrics_answers_are_explained() -> None:
    async def body() -> None:
        async with engines() as (_, url):
            scraper = MetricsScraper()
            results = await scraper.scrape({n: f"{url}/{n}" for n in ("html", "broken", "nometrics")})
            await scraper.close()
        assert results["html"].error == (
            "GET /metrics answered text that is not usable: "
            "no vllm:num_requests_running in the metrics: is this a vLLM engine?"
        )
        assert results["broken"].error == "GET /metrics answered 500: Internal Server Error traceback ..."
        assert results["nometrics"].error == "GET /metrics answered 404: no /metrics here: is this a vLLM OpenAI server?"
        assert {r.failure for r in results.values()} == {Failure.ENGINE}

    run(body)


def test_hanging_engine_times_out_without_holding_up_the_others() -> None:
    async def body() -> None:
        async with engines() as (_, url):
            scraper = MetricsScraper(timeout=0.3)
            results = await scraper.scrape({"stuck": f"{url}/hang", "fine": f"{url}/busy"})
            await scraper.close()
        assert results["stuck"].error == "GET /health: timeout after 0.3s"
        assert results["stuck"].failure is Failure.NETWORK
        assert results["fine"].sample is not None

    run(body)


def test_closed_port_is_connection_refused() -> None:
    async def body() -> None:
        port = closed_port()
        scraper = MetricsScraper()
        results = await scraper.scrape({"pod-a": f"http://127.0.0.1:{port}"})
        await scraper.close()
        assert results["pod-a"].error == f"GET /health: connection refused by 127.0.0.1:{port}"
        assert results["pod-a"].failure is Failure.NETWORK

    run(body)


def test_concurrency_bound_is_honoured() -> None:
    async def body() -> None:
        async with engines() as (fake, url):
            scraper = MetricsScraper(concurrency=3)
            results = await scraper.scrape({f"pod-{i}": f"{url}/slow{i}" for i in range(10)})
            await scraper.close()
            assert all(r.sample is not None for r in results.values())
            assert fake.requests == 20  # /health and /metrics of each
            assert fake.most_in_flight == 3

    run(body)


def test_api_key_is_sent_as_bearer_token_and_connections_are_reused() -> None:
    async def body() -> None:
        async with engines() as (fake, url):
            scraper = MetricsScraper(api_key="s3cret")
            first = await scraper.scrape({"pod-a": f"{url}/busy"})
            second = await scraper.scrape({"pod-a": f"{url}/busy"})
            await scraper.close()
        assert first["pod-a"].sample is not None and second["pod-a"].sample is not None
        assert fake.authorization == ["Bearer s3cret"] * 4
        # /metrics followed /health on its connection, and the second scrape reused it.
        assert len(fake.client_ports) == 1

    run(body)


def test_empty_target_list() -> None:
    async def body() -> None:
        scraper = MetricsScraper()
        assert await scraper.scrape({}) == {}
        await scraper.close()

    run(body)


def test_scrape_state_gives_rates_and_forgets_what_is_gone() -> None:
    state = ScrapeState()
    key = ("ai", "llama")
    first = state.advance(key, {"a": parse_sample(IDLE, 100.0), "b": parse_sample(IDLE, 100.0)}, NOW)
    assert first.generation_tokens_per_second == 0.0 and first.scraped_replicas == 2
    second = state.advance(key, {"a": parse_sample(BUSY, 110.0)}, NOW)
    assert second.generation_tokens_per_second == 284.0
    # "b" was not in the last scrape, so on its return it has no interval yet.
    third = state.advance(key, {"a": parse_sample(BUSY, 120.0), "b": parse_sample(BUSY, 120.0)}, NOW)
    assert third.generation_tokens_per_second == 0.0 and third.requests_running == 80
    state.retain([])
    again = state.advance(key, {"a": parse_sample(BUSY, 130.0)}, NOW)
    assert again.ttft_seconds_p50 is None


OK = ScrapeResult(sample=parse_sample(IDLE, 1.0))
TIMEOUT = ScrapeResult(error="GET /health: timeout after 1.5s", failure=Failure.NETWORK)
BROKEN = ScrapeResult(error="GET /metrics answered 500: Internal Server Error", failure=Failure.ENGINE)
DEAD = ScrapeResult(error="GET /health answered 503: engine core is dead", failure=Failure.DEAD)


def sweeps(*rounds: dict[str, ScrapeResult]) -> list[dict[str, str]]:
    """The unhealthy map after each sweep, carrying the streaks from one sweep to the next."""
    streaks: dict[str, int] = {}
    unhealthy = []
    for results in rounds:
        streaks, found = judge_health(streaks, results)
        unhealthy.append(found)
    return unhealthy


def test_one_failed_scrape_is_not_unhealthy() -> None:
    assert sweeps({"a": TIMEOUT, "b": BROKEN}) == [{}]


def test_a_replica_that_fails_once_then_answers_never_shows_unhealthy() -> None:
    assert sweeps({"a": TIMEOUT}, {"a": OK}, {"a": TIMEOUT}, {"a": OK}) == [{}, {}, {}, {}]


def test_two_failed_scrapes_in_a_row_are_unhealthy_and_say_whose_fault() -> None:
    unreachable = "unreachable: GET /health: timeout after 1.5s (2 scrapes in a row)"
    engine = "engine unhealthy: GET /metrics answered 500: Internal Server Error (2 scrapes in a row)"
    both = {"a": TIMEOUT, "b": BROKEN}
    # The message stays the same while the failure lasts: a new one every sweep would rewrite the status.
    assert sweeps(both, both, both) == [{}, {"a": unreachable, "b": engine}, {"a": unreachable, "b": engine}]


def test_failures_of_either_kind_count_towards_the_same_streak() -> None:
    assert sweeps({"a": BROKEN}, {"a": TIMEOUT})[-1] == {
        "a": "unreachable: GET /health: timeout after 1.5s (2 scrapes in a row)"
    }


def test_a_dead_engine_core_is_unhealthy_at_once() -> None:
    assert sweeps({"a": DEAD, "b": OK}) == [{"a": "engine unhealthy: GET /health answered 503: engine core is dead"}]


def test_recovery_clears_the_streak() -> None:
    assert sweeps({"a": TIMEOUT}, {"a": TIMEOUT}, {"a": OK}, {"a": TIMEOUT})[1:] == [
        {"a": "unreachable: GET /health: timeout after 1.5s (2 scrapes in a row)"},
        {},
        {},
    ]


def test_streaks_of_replicas_that_are_gone_are_forgotten() -> None:
    streaks, _ = judge_health({}, {"a": TIMEOUT, "b": TIMEOUT})
    streaks, _ = judge_health(streaks, {"b": OK})
    assert streaks == {}
    # "a" is back (a new Pod of the same name): its first failure is its first.
    assert judge_health(streaks, {"a": TIMEOUT})[1] == {}


class RecordingController:
    """Stands in for the controller: fixed scrape targets, and every update_engine call kept."""

    def __init__(self) -> None:
        self.targets: dict[Key, dict[str, str]] = {}
        self.updates: list[tuple[Key, EngineStats | None, dict[str, str]]] = []

    def scrape_targets(self) -> dict[Key, dict[str, str]]:
        return {key: dict(pods) for key, pods in self.targets.items()}

    def update_engine(self, key: Key, stats: EngineStats | None, unhealthy: dict[str, str]) -> None:
        self.updates.append((key, stats, unhealthy))


def test_sweeps_report_a_replica_unhealthy_only_on_a_dead_engine_or_a_second_failure() -> None:
    key = ("ai", "llama")
    port = closed_port()
    dead = "engine unhealthy: GET /health answered 503: engine core is dead"
    refused = f"unreachable: GET /health: connection refused by 127.0.0.1:{port} (2 scrapes in a row)"

    async def body() -> None:
        async with engines() as (fake, url):
            controller = RecordingController()
            monitor = EngineMonitor(controller, interval=1.0, timeout=5.0, concurrency=8)
            pods = {"ok": f"{url}/busy", "flaky": f"{url}/flaky", "dead": f"{url}/dead"}
            controller.targets[key] = pods | {"down": f"http://127.0.0.1:{port}"}
            fake.fail_next.add("flaky")
            try:
                await monitor.sweep()
                await monitor.sweep()
                controller.targets[key] = pods  # Pod "down" is gone ...
                await monitor.sweep()
                controller.targets[key] = pods | {"down": f"http://127.0.0.1:{port}"}  # ... and back
                await monitor.sweep()
                controller.targets = {}  # the LLMDeployment is gone
                await monitor.sweep()
            finally:
                await monitor.close()
        assert [update[0] for update in controller.updates] == [key] * 5
        assert [update[2] for update in controller.updates] == [
            {"dead": dead},
            {"dead": dead, "down": refused},
            {"dead": dead},
            {"dead": dead},
            {},
        ]
        scraped = [update[1].scraped_replicas if update[1] else 0 for update in controller.updates]
        assert scraped == [1, 2, 2, 2, 0]

    run(body)
