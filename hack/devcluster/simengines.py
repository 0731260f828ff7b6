"""Simulated vLLM engines for the Pods kwok runs on the fake GPU, Gaudi and CPU nodes.

kwok gives those Pods IPs from a loopback range; this process listens on ``<podIP>:8000`` for each
of them and answers ``/health``, ``/v1/models`` and ``/metrics`` with a real captured vLLM body.
In ``busy`` mode the counters advance with time, in ``idle`` mode they stand still, so the
operator's scraper sees exactly what real engines would show.

    python -m devcluster.simengines --kubeconfig K --cidr 127.64.0.0/16 [--admin-port P] [--mode idle]

``POST http://127.0.0.1:<admin-port>/mode/busy`` (or ``/mode/idle``) switches the mode;
``GET /engines`` lists the served addresses; ``PUT /engines/<podIP>/load`` with a JSON object of gauge
names and values (``{"vllm:num_requests_waiting": 40}``) sets what one engine reports, ``DELETE`` drops that.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import resource
import threading
import time
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


class Engines:
    def __init__(self, cidr: str, body: MetricsBody, mode: str) -> None:
        self.network = ipaddress.ip_network(cidr)
        self.body = body
        self.gauges: dict[str, dict[str, float]] = {}  # pod IP -> gauges a test set
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
            text = self.body.render(self.busy_seconds())
            gauges = self.gauges.get(request.transport.get_extra_info("sockname")[0]) if request.transport else None
            return web.Response(text=with_gauges(text, gauges) if gauges else text, content_type="text/plain")

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": []})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/v1/models", models)
        return app

    async def serve(self, ip: str) -> None:
        if ip in self.sites or ipaddress.ip_address(ip) not in self.network:
            return
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, ip, ENGINE_PORT, reuse_address=True).start()
        self.sites[ip] = runner

    async def forget(self, ip: str) -> None:
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

    admin.router.add_post("/mode/{mode}", set_mode)
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
