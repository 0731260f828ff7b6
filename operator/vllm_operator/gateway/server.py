"""The gateway's HTTP side: one OpenAI-compatible endpoint in front of every LLMDeployment.

A request names a model; the gateway finds the LLMDeployment that serves it, checks its API key, picks a
Ready replica (routing.py) and relays the answer. Server-Sent Events are written on as each chunk
arrives, never gathered. A client that goes away cancels the request to the engine (the handler is
cancelled and the upstream connection closed, which vLLM takes as an abort). A connection that fails
before the engine sent a byte is tried once more on another replica; after the first byte it is not, as
the client already holds half an answer. Errors have OpenAI's JSON shape. Keys are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vllm_operator.gateway.routing import PrefixRing, ReplicaLoad, UnknownModel, least_load, prompt_prefix, resolve
from vllm_operator.gateway.watch import Fleet, Served, WakeTimeout, epoch
from vllm_operator.kube import KubeError

log = logging.getLogger(__name__)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Seconds a client is told to wait after a 503: about one autoscaler scrape, or a replica's readiness probe.
RETRY_AFTER = 5
# Latency buckets from a cached embedding (ms) to a long generation (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAKE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# The code requests count under when the client went away before the answer ended (as nginx logs them).
CLIENT_GONE = "499"
# Label value of requests that name no served model, so unknown names cannot grow the metrics without bound.
UNKNOWN = ""


class Metrics:
    """The gateway's own /metrics, per model."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vllm_gateway_requests_total", "Requests answered, by model and HTTP status code.",
                                ["model", "code"], registry=self.registry)
        self.latency = Histogram("vllm_gateway_request_duration_seconds",
                                 "From the request's arrival to the last byte of its answer.", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_byte = Histogram("vllm_gateway_time_to_first_byte_seconds",
                                    "From the request's arrival to the engine's first byte of answer.", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.retries = Counter("vllm_gateway_retries_total",
                               "Requests sent again to another replica after a connection failed before any byte.",
                               ["model"], registry=self.registry)
        self.wake_wait = Histogram("vllm_gateway_wake_wait_seconds",
                                   "Time requests waited for an LLMDeployment to wake from zero replicas.", ["model"],
                                   buckets=WAKE_BUCKETS, registry=self.registry)
        self.wakes = Counter("vllm_gateway_wakes_total",
                             "Scale-ups from zero replicas the gateway asked for, by model.", ["model"],
                             registry=self.registry)
        self.in_flight = Gauge("vllm_gateway_requests_in_flight", "Requests being answered, by model.", ["model"],
                               registry=self.registry)


def error(status: int, message: str, type_: str, code: str | None = None,
          headers: Mapping[str, str] | None = None) -> web.Response:
    """An answer in OpenAI's error shape."""
    return web.json_response({"error": {"message": message, "type": type_, "param": None, "code": code}},
                             status=status, headers=headers)


def _sse_error(message: str) -> bytes:
    # What the OpenAI clients raise as an APIError when it arrives inside a stream.
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": "engine_disconnected"}}
    return f"data: {json.dumps(body)}\n\n".encode()


class Gateway:
    def __init__(self, fleet: Fleet, wake_timeout: float) -> None:
        self.fleet = fleet
        self.wake_timeout = wake_timeout
        self.metrics = Metrics()
        fleet.on_wake = lambda served: self.metrics.wakes.labels(served.model).inc()
        self.in_flight: defaultdict[str, int] = defaultdict(int)  # host:port -> requests sent and not finished
        self._turn = 0
        self._rings: dict[frozenset[str], PrefixRing] = {}
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # long prompts, images as data URLs
        for route in ROUTES:
            app.router.add_post(route, self.proxy)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.on_cleanup.append(self._close)
        return app

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No overall timeout: a generation may run for minutes; a dead engine shows as a broken connection.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                auto_decompress=False, skip_auto_headers=("User-Agent",))
        return self._session

    async def _close(self, _: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    # -- small endpoints -------------------------------------------------------------------------------

    async def models(self, _: web.Request) -> web.Response:
        # A LoRA adapter names its base model as parent, as vLLM's own listing does.
        data = [{"id": name, "object": "model", "created": epoch(s.created), "owned_by": "vllm-operator",
                 "parent": None if name == s.model else s.model,
                 "namespace": s.namespace, "llmdeployment": s.name, "phase": s.phase, "routing": s.strategy,
                 "ready_replicas": len(self.fleet.addresses(s.key))}
                for name, s in sorted(self.fleet.by_model.items())]
        return web.json_response({"object": "list", "data": data})

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(self, _: web.Request) -> web.Response:
        # Ready once every watch has listed: before that, every model would look unknown.
        return web.Response(text="ok") if self.fleet.synced.is_set() else web.Response(status=503, text="syncing")

    # -- routing ---------------------------------------------------------------------------------------

    def _pick(self, served: Served, body: Mapping[str, Any], addresses: list[str]) -> str:
        if served.strategy == "PrefixHash":
            members = frozenset(addresses)
            ring = self._rings.get(members)
            if ring is None:
                if len(self._rings) > 1024:  # replica sets come and go: keep the cache from growing forever
                    self._rings.clear()
                ring = self._rings[members] = PrefixRing(addresses)
            return ring.pick(prompt_prefix(body), self.in_flight)
        # status.engine sums every replica: each gets its share, and this gateway's own counts tell them apart.
        waiting = served.waiting / len(addresses)
        kv_cache = served.kv_cache_percent / 100
        self._turn += 1
        return least_load({a: ReplicaLoad(self.in_flight[a], waiting, kv_cache) for a in addresses}, self._turn)

    async def _authorized(self, request: web.Request, served: Served) -> web.Response | None:
        """None when the request may go on, else the error to answer."""
        if served.api_key_ref is None:
            return None
        try:
            key = await self.fleet.api_key(served)
        except KubeError as exc:
            log.warning("reading the API key Secret %s/%s: %s", served.namespace, served.api_key_ref[0], exc)
            return error(503, "the gateway cannot read this model's API key Secret", "service_unavailable",
                         headers={"Retry-After": str(RETRY_AFTER)})
        sent = request.headers.get("Authorization", "")
        if key is not None and hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
            return None
        return error(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                     "invalid_request_error", "invalid_api_key")

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return self._count(UNKNOWN, error(400, f"The request body is not valid JSON: {exc}",
                                              "invalid_request_error", "invalid_json"))
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            return self._count(UNKNOWN, error(400, "The request body must be a JSON object with a 'model' string.",
                                              "invalid_request_error", "missing_model"))
        try:
            served = resolve(model, self.fleet.by_model)
        except UnknownModel as unknown:
            hint = f" Did you mean {', '.join(repr(c) for c in unknown.close)}?" if unknown.close else ""
            return self._count(UNKNOWN, error(404, f"The model '{model}' does not exist.{hint}",
                                              "invalid_request_error", "model_not_found"))
        if (refused := await self._authorized(request, served)) is not None:
            return self._count(model, refused)
        gauge = self.metrics.in_flight.labels(model)
        gauge.inc()
        try:
            response = await self._serve(request, served, raw, body, started)
        except asyncio.CancelledError:
            self.metrics.requests.labels(model, CLIENT_GONE).inc()
            raise
        finally:
            gauge.dec()
        self.metrics.latency.labels(model).observe(time.perf_counter() - started)
        return self._count(model, response)

    def _count(self, model: str, response: web.StreamResponse) -> web.StreamResponse:
        self.metrics.requests.labels(model, str(response.status)).inc()
        return response

    async def _serve(self, request: web.Request, served: Served, raw: bytes, body: Mapping[str, Any],
                     started: float) -> web.StreamResponse:
        addresses = self.fleet.addresses(served.key)
        if not addresses:
            waited = time.perf_counter()
            try:
                addresses = await self.fleet.ready_addresses(served, self.wake_timeout)
            except WakeTimeout as exc:
                return error(503, f"No replica of model '{served.model}' is ready: {exc}.", "service_unavailable",
                             "no_ready_replica", headers={"Retry-After": str(RETRY_AFTER)})
            finally:
                self.metrics.wake_wait.labels(served.model).observe(time.perf_counter() - waited)
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if "Authorization" in request.headers:  # the engine checks its own key too
            headers["Authorization"] = request.headers["Authorization"]
        candidates = list(addresses.values())
        for attempt in range(2):
            address = self._pick(served, body, candidates)
            self.in_flight[address] += 1
            try:
                try:
                    upstream = await self._client().post(f"http://{address}{request.path}", data=raw,
                                                         headers=headers)
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                    candidates.remove(address)
                    if attempt == 0 and candidates:
                        self.metrics.retries.labels(served.model).inc()
                        continue
                    return error(502, f"The engine of model '{served.model}' did not answer: "
                                      f"{str(exc) or type(exc).__name__}.", "upstream_error", "engine_unreachable")
                try:
                    return await self._relay(request, served, upstream, started)
                finally:
                    upstream.close()  # after a complete answer the connection is back in the pool already
            finally:
                self.in_flight[address] -= 1
                if not self.in_flight[address]:
                    del self.in_flight[address]  # replicas come and go: keep only those with requests
        raise AssertionError("the second attempt returns")

    async def _relay(self, request: web.Request, served: Served, upstream: aiohttp.ClientResponse,
                     started: float) -> web.StreamResponse:
        content_type = upstream.headers.get("Content-Type", "application/json")
        first_byte = self.metrics.first_byte.labels(served.model)
        if not content_type.startswith("text/event-stream"):
            first_byte.observe(time.perf_counter() - started)
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return error(502, f"The engine of model '{served.model}' broke off its answer: "
                                  f"{str(exc) or type(exc).__name__}.", "upstream_error", "engine_disconnected")
            return web.Response(body=data, status=upstream.status, headers={"Content-Type": content_type})
        response = web.StreamResponse(status=upstream.status, headers={
            "Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        first = True
        try:
            async for chunk in upstream.content.iter_any():
                if first:
                    first_byte.observe(time.perf_counter() - started)
                    first = False
                await response.write(chunk)
        except ConnectionResetError as exc:
            # Only writing to the client raises it (aiohttp's ClientConnectionResetError): the client left.
            # As a cancellation, which aiohttp ends quietly.
            raise asyncio.CancelledError from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            if request.transport is None or request.transport.is_closing():
                raise asyncio.CancelledError from exc  # the client left too
            # Too late for a status code: end the stream with an error event the client raises.
            log.warning("engine of %s/%s broke off a stream: %s", served.namespace, served.name, exc)
            try:
                await response.write(_sse_error(f"The engine of model '{served.model}' broke off its answer."))
            except ConnectionResetError as gone:
                raise asyncio.CancelledError from gone
            response.force_close()
        try:
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client hung up once it had the whole answer, before the closing chunk
        return response


async def serve(fleet: Fleet, host: str, port: int, wake_timeout: float) -> None:
    """Run the gateway until cancelled."""
    gateway = Gateway(fleet, wake_timeout)
    runner = web.AppRunner(gateway.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    watching = asyncio.create_task(fleet.run())
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("gateway listening on %s:%d", host, port)
        await watching
    finally:
        watching.cancel()
        await runner.cleanup()
