"""Simulated vLLM engines for the Pods kwok runs on the fake GPU, Gaudi and CPU nodes.

kwok gives those Pods IPs from a loopback range; this process listens on ``<podIP>:8000`` for each
of them and answers ``/health``, ``/v1/models`` and ``/metrics`` with a real captured vLLM body, and
``/v1/chat/completions``, ``/v1/completions`` (both streamed as Server-Sent Events on ``"stream": true``)
and ``/v1/embeddings`` in vLLM's shapes, with a few fixed words, one per token; ``system_fingerprint``
names the engine (``sim-<podIP>``) so that a test sees which replica answered.
In ``busy`` mode the counters advance with time, in ``idle`` mode they stand still, so the
operator's scraper sees exactly what real engines would show.

    python -m devcluster.simengines --kubeconfig K --cidr 127.64.0.0/16 [--admin-port P] [--mode idle]

``POST http://127.0.0.1:<admin-port>/mode/busy`` (or ``/mode/idle``) switches the mode;
``GET /engines`` lists the served addresses; ``PUT /engines/<podIP>/load`` with a JSON object of gauge
names and values (``{"vllm:num_requests_waiting": 40}``) sets what one engine reports, ``DELETE`` drops that.
``PUT /engines/<podIP>/fault`` with ``{"fault": "garbage"}`` (a /metrics body no parser reads), ``"hang"`` (a
/metrics that never answers) or ``"dead"`` (the engine stops listening) breaks one engine; ``DELETE`` mends it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import resource
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from kubernetes import client, config, watch
from prometheus_client.parser import text_string_to_metric_families

ENGINE_PORT = 8000
METRICS_FILE = Path(__file__).resolve().parents[2] / "tests" / "data" / "vllm-0.32.0" / "metrics-busy.txt"
SELECTOR = "app.kubernetes.io/managed-by=vllm-operator"
# Counters grow by this fraction of their captured value per second in busy mode.
BUSY_GROWTH_PER_SECOND = 0.01
# What the engines answer, one word a token, over and over.
WORDS = ("The", "simulated", "engine", "answers", "with", "these", "words", "and", "then", "again")
# Tokens of an answer that names no max_tokens (vLLM's default, the rest of the context, would be thousands).
DEFAULT_MAX_TOKENS = 16
EMBEDDING_SIZE = 8


class MetricsBody:
    """The captured body as lines whose counter values can be advanced."""

    def __init__(self, text: str) -> None:
        growing = set()
        for family in text_string_to_metric_families(text):
            if family.type in ("counter", "histogram"):
                growing.update(sample.name for sample in family.samples if not sample.name.endswith("_created"))
        self._lines: list[tuple[str, float | None]] = []
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if line.startswith("#") or name not in growing:
                self._lines.append((line, None))
            else:
                head, value = line.rsplit(" ", 1)
                self._lines.append((head, float(value)))
        self._step = -1
        self._text = ""

    def render(self, elapsed_busy: float) -> str:
        # Counters advance once a busy second, so one text serves every engine of a sweep: the
        # simulation shares the operator's cores and must not be what a sweep's time measures.
        step = int(elapsed_busy)
        if step != self._step:
            factor = 1.0 + BUSY_GROWTH_PER_SECOND * step
            self._text = "\n".join(head if value is None else f"{head} {value * factor}"
                                   for head, value in self._lines) + "\n"
            self._step = step
        return self._text


def admin_url(kubeconfig: Path) -> str:
    """The admin endpoint of the cluster ``kubeconfig`` points at: its port is a fixed offset from the apiserver's."""
    from devcluster.cluster import Ports
    from vllm_operator.kube import Credentials

    apiserver_port = urlsplit(Credentials.load(str(kubeconfig)).host).port or 443
    default = Ports()
    return f"http://127.0.0.1:{Ports(apiserver_port - (default.apiserver - default.base)).simengines_admin}"


def with_gauges(text: str, gauges: dict[str, float]) -> str:
    """The body with the named gauges' samples set to the given values (one engine per body)."""
    lines = []
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        lines.append(f"{line.rsplit(' ', 1)[0]} {float(gauges[name])}" if name in gauges else line)
    return "\n".join(lines) + "\n"


def _words(body: dict[str, Any]) -> list[str]:
    count = int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS)
    return [WORDS[i % len(WORDS)] + (" " if i < count - 1 else "") for i in range(count)]


def _prompt_tokens(body: dict[str, Any]) -> int:
    text = json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
    return max(1, len(text.split()))


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


class Engines:
    def __init__(self, cidr: str, body: MetricsBody, mode: str, port: int = ENGINE_PORT) -> None:
        self.network = ipaddress.ip_network(cidr)
        self.port = port
        self.token_delay = 0.0  # seconds between streamed tokens
        self.aborted: dict[str, int] = {}  # pod IP -> streams the client left before the end
        self._streaming: dict[str, set[asyncio.BaseTransport]] = {}  # pod IP -> connections streaming now
        self.body = body
        self.gauges: dict[str, dict[str, float]] = {}  # pod IP -> gauges a test set
        self.faults: dict[str, str] = {}  # pod IP -> how a test broke its /metrics ("garbage" or "hang")
        self.busy = mode == "busy"
        self._busy_seconds = 0.0
        self._busy_since = time.monotonic()
        self.sites: dict[str, web.AppRunner] = {}
        self.app = self._engine_app()

    def set_mode(self, mode: str) -> None:
        now = time.monotonic()
        if self.busy:
            self._busy_seconds += now - self._busy_since
        self.busy, self._busy_since = mode == "busy", now

    def busy_seconds(self) -> float:
        return self._busy_seconds + (time.monotonic() - self._busy_since if self.busy else 0.0)

    def _engine_app(self) -> web.Application:
        async def health(_: web.Request) -> web.Response:
            return web.Response(text="")

        async def metrics(request: web.Request) -> web.Response:
            ip = self._engine_ip(request)
            while self.faults.get(ip) == "hang":  # until mended, so that hung requests do not pile up
                await asyncio.sleep(0.5)
            if self.faults.get(ip) == "garbage":
                return web.Response(text="vllm:num_requests_running{model_name= 1 2 3\n\x00\x01", content_type="text/plain")
            text = self.body.render(self.busy_seconds())
            gauges = self.gauges.get(request.transport.get_extra_info("sockname")[0]) if request.transport else None
            return web.Response(text=with_gauges(text, gauges) if gauges else text, content_type="text/plain")

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": []})

        app = web.Application()
        for path in ("/v1/chat/completions", "/v1/completions"):
            app.router.add_post(path, self._complete)
        app.router.add_post("/v1/embeddings", self._embed)
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/v1/models", models)
        return app

    @staticmethod
    def _engine_ip(request: web.Request) -> str:
        return str(request.transport.get_extra_info("sockname")[0]) if request.transport else ""

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        """A chat or text completion of the fixed words, whole or streamed token by token."""
        body = await request.json()
        ip, chat = self._engine_ip(request), request.path.endswith("/chat/completions")
        words, prompt_tokens = _words(body), _prompt_tokens(body)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.get("model"), "system_fingerprint": f"sim-{ip}"}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        if not body.get("stream"):
            text = "".join(words)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": "length"} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"})
            return web.json_response({**head, "object": "chat.completion" if chat else "text_completion",
                                      "choices": [choice], "usage": usage})
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict[str, Any] | str, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": delta}
            return _sse({**head, "object": kind, "choices": [{**choice, "logprobs": None, "finish_reason": finish}]})

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        streaming = self._streaming.setdefault(ip, set())
        if request.transport is not None:
            streaming.add(request.transport)
        try:
            if chat:
                await response.write(chunk({"role": "assistant", "content": ""}))
            for word in words:
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                await response.write(chunk({"content": word} if chat else word))
            await response.write(chunk({} if chat else "", "length"))
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(_sse({**head, "object": kind, "choices": [], "usage": usage}))
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted[ip] = self.aborted.get(ip, 0) + 1
            raise
        finally:
            streaming.discard(request.transport)
        return response

    async def _embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i,
                 "embedding": [zlib.crc32(f"{k}:{text}".encode()) % 1000 / 1000 for k in range(EMBEDDING_SIZE)]}
                for i, text in enumerate(inputs)]
        tokens = _prompt_tokens(body)
        return web.json_response({"object": "list", "data": data, "model": body.get("model"),
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def serve(self, ip: str) -> None:
        if ip in self.sites or ipaddress.ip_address(ip) not in self.network:
            return
        # A deleted Pod's engine is gone at once; it does not wait for its clients to finish (default: 60 s).
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, ip, self.port, reuse_address=True).start()
        self.sites[ip] = runner

    async def kill(self, ip: str) -> None:
        """As if the engine process died: its streams break off mid-answer and it stops listening."""
        for transport in self._streaming.pop(ip, set()):
            transport.abort()
        await self.forget(ip)

    async def forget(self, ip: str) -> None:
        # A later Pod may get the address: it starts with the default load, not this engine's.
        self.gauges.pop(ip, None)
        runner = self.sites.pop(ip, None)
        if runner is not None:
            await runner.cleanup()


def _watch_pods(kubeconfig: str, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[str, str]]) -> None:
    api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
    while True:
        try:
            for event in watch.Watch().stream(api.list_pod_for_all_namespaces, label_selector=SELECTOR,
                                              timeout_seconds=300):
                pod: Any = event["object"]
                ip = pod.status.pod_ip if pod.status else None
                if not ip:
                    continue
                gone = event["type"] == "DELETED" or pod.metadata.deletion_timestamp is not None
                loop.call_soon_threadsafe(queue.put_nowait, ("forget" if gone else "serve", ip))
        except Exception as exc:  # the apiserver restarting must not end the simulation
            print(json.dumps({"event": "watch-error", "error": str(exc)}), flush=True)
            time.sleep(1)


async def main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    engines = Engines(args.cidr, MetricsBody(METRICS_FILE.read_text()), args.mode)

    admin = web.Application()

    async def set_mode(request: web.Request) -> web.Response:
        mode = request.match_info["mode"]
        if mode not in ("busy", "idle"):
            raise web.HTTPBadRequest(text="mode is busy or idle")
        engines.set_mode(mode)
        return web.json_response({"mode": mode})

    async def listing(_: web.Request) -> web.Response:
        return web.json_response(sorted(engines.sites))

    async def set_load(request: web.Request) -> web.Response:
        gauges = await request.json()
        if not isinstance(gauges, dict) or not all(isinstance(v, (int, float)) for v in gauges.values()):
            raise web.HTTPBadRequest(text="a JSON object of gauge names and numbers")
        engines.gauges[request.match_info["ip"]] = gauges
        return web.json_response(gauges)

    async def drop_load(request: web.Request) -> web.Response:
        engines.gauges.pop(request.match_info["ip"], None)
        return web.json_response({})

    async def set_fault(request: web.Request) -> web.Response:
        fault = (await request.json()).get("fault")
        if fault not in ("garbage", "hang", "dead"):
            raise web.HTTPBadRequest(text='{"fault": "garbage", "hang" or "dead"}')
        ip = request.match_info["ip"]
        if fault == "dead":
            await engines.kill(ip)
        else:
            engines.faults[ip] = fault
        return web.json_response({"fault": fault})

    async def drop_fault(request: web.Request) -> web.Response:
        ip = request.match_info["ip"]
        if engines.faults.pop(ip, None) is None:
            await engines.serve(ip)  # a dead engine comes back, as a restarted container would
        return web.json_response({})

    admin.router.add_post("/mode/{mode}", set_mode)
    admin.router.add_put("/engines/{ip}/fault", set_fault)
    admin.router.add_delete("/engines/{ip}/fault", drop_fault)
    admin.router.add_get("/engines", listing)
    admin.router.add_put("/engines/{ip}/load", set_load)
    admin.router.add_delete("/engines/{ip}/load", drop_load)
    runner = web.AppRunner(admin, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.admin_port).start()

    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_watch_pods, args=(args.kubeconfig, loop, queue), daemon=True).start()
    print(json.dumps({"event": "started", "cidr": args.cidr, "admin_port": args.admin_port}), flush=True)
    while True:
        action, ip = await queue.get()
        try:
            await (engines.serve(ip) if action == "serve" else engines.forget(ip))
        except OSError as exc:
            print(json.dumps({"event": "listen-error", "ip": ip, "error": str(exc)}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="devcluster.simengines", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--cidr", required=True, help="kwok's pod CIDR; must be a loopback range")
    parser.add_argument("--admin-port", type=int, default=18099)
    parser.add_argument("--mode", choices=("idle", "busy"), default="idle")
    args = parser.parse_args(argv)
    if not ipaddress.ip_network(args.cidr).is_loopback:
        parser.error(f"--cidr {args.cidr} is not a loopback range; simulated engines only listen on loopback")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
