"""The ``vllm-operator`` command: ``run`` the operator, run the ``gateway``, print/write the CRDs, or ask for a
serving ``bench``mark."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


# Client-side limit of the reconciler's apiserver requests: a guard, not a pace. The apiserver's priority
# and fairness protects it (the client retries its 429s); controller-runtime dropped its own default limit
# (20/s, burst 30) for that reason. A new LLMDeployment costs about 9 requests (three children, status,
# Events) and each about 2.5 ms of the operator's CPU, reconcile included (measured on a burst of 100), so
# one core sends at most ~400 a second: 500 never slows a burst of 1,000, where the usual 50-200 would on
# an apiserver faster than the operator.
KUBE_API_QPS = 500.0
KUBE_API_BURST = 1000


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535 (0 turns it off), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-operator", description="Serve LLMs on Kubernetes with vLLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the operator against the current cluster")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], dest="namespaces",
                       help="watch this namespace (repeat for several); default: all namespaces")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    run.add_argument("--kubeconfig", help="kubeconfig file; default: in-cluster config, then $KUBECONFIG")
    run.add_argument("--metrics-port", type=_port, default=8080, help="port of the operator's /metrics (0: off)")
    run.add_argument("--health-port", type=_port, default=8081, help="port of the /healthz liveness endpoint (0: off)")
    run.add_argument("--log-format", choices=("json", "text"), default="json", help="log line format")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    run.add_argument("--workers", type=_positive(int), default=32, help="LLMDeployments reconciled at once")
    run.add_argument("--kube-api-qps", type=_positive(float), default=KUBE_API_QPS,
                     help="requests a second to the apiserver, after a burst (client-side limit)")
    run.add_argument("--kube-api-burst", type=_positive(int), default=KUBE_API_BURST,
                     help="requests to the apiserver at once before --kube-api-qps applies")
    run.add_argument("--scrape-interval", type=_positive(float), default=15.0,
                     help="seconds between scrapes of the engines' /metrics")
    run.add_argument("--scrape-timeout", type=_positive(float), default=5.0, help="seconds one scrape may take")
    run.add_argument("--status-min-interval", type=_positive(float), default=30.0,
                     help="seconds between writes of one LLMDeployment's engine load figures into its status "
                          "(phase and conditions are written at once)")
    run.add_argument("--status-writes-per-second", type=_positive(float), default=100.0,
                     help="status writes of engine load figures a second, shared fairly by every LLMDeployment")
    run.add_argument("--scrape-concurrency", type=_positive(int), default=64, help="engines scraped in parallel")
    run.add_argument("--model-puller-image",
                     help="image of the Jobs that download Hugging Face models into cache claims (docs/images.md); "
                          "default: vllm-model-puller:2.4.0")
    run.add_argument("--leader-elect", action="store_true",
                     help="for several replicas: only the holder of a Lease reconciles and scrapes, the others stand by")
    run.add_argument("--leader-election-namespace", default=os.environ.get("POD_NAMESPACE"),
                     help="namespace of the Lease (default: $POD_NAMESPACE)")
    run.add_argument("--leader-election-id", default="vllm-operator", help="name of the Lease")

    bench = commands.add_parser(
        "bench", help="run vLLM's serving benchmark against an LLMDeployment (once it is Ready)",
        description="Asks the operator, through the llm.vllm-operator.io/benchmark annotation, to run `vllm bench "
                    "serve` as a Job against the LLMDeployment's Service; the result lands in status.benchmark, an "
                    "Event and the ConfigMap <name>-benchmark.")
    bench.add_argument("name", help="the LLMDeployment")
    bench.add_argument("-n", "--namespace", help="its namespace; default: the kubeconfig context's")
    bench.add_argument("--kubeconfig", help="kubeconfig file; default: $KUBECONFIG, then ~/.kube/config")
    bench.add_argument("--dataset", choices=("random", "sharegpt"), help="prompts (default: random)")
    bench.add_argument("--dataset-path", help="for sharegpt: the JSON file, relative to the model cache volume")
    bench.add_argument("--num-prompts", type=int, help="requests to send (default: 100)")
    bench.add_argument("--request-rate", type=float, help="requests a second (default: all at once)")
    bench.add_argument("--max-concurrency", type=int, help="most requests in flight (default: no limit)")
    bench.add_argument("--input-len", type=int, help="random dataset: prompt tokens (default: 1024)")
    bench.add_argument("--output-len", type=int, help="generated tokens per request (default: 128 for random)")
    bench.add_argument("--wait", action="store_true", help="wait for the result and print it")
    bench.add_argument("--timeout", type=_positive(float), default=3900.0, help="seconds --wait waits at most")

    gateway = commands.add_parser(
        "gateway", help="serve one OpenAI-compatible endpoint for every LLMDeployment (see docs/gateway.md)",
        description="Routes each request by its model to a Ready replica of the LLMDeployment that serves it, "
                    "wakes LLMDeployments from zero replicas, checks their API keys and streams answers through.")
    gateway_scope = gateway.add_mutually_exclusive_group()
    gateway_scope.add_argument("-n", "--namespace", action="append", default=[], dest="namespaces",
                               help="serve the LLMDeployments of this namespace (repeat for several); default: all")
    gateway_scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace (the default)")
    gateway.add_argument("--kubeconfig", help="kubeconfig file; default: in-cluster config, then $KUBECONFIG")
    gateway.add_argument("--host", default="0.0.0.0", help="address to listen on")
    gateway.add_argument("--port", type=_port, default=8000, help="port of the API, /metrics, /healthz and /readyz")
    gateway.add_argument("--wake-timeout", type=_positive(float), default=600.0,
                         help="seconds a request for an LLMDeployment at zero replicas waits for one to be Ready")
    gateway.add_argument("--log-format", choices=("json", "text"), default="json", help="log line format")
    gateway.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")

    crds = commands.add_parser("crds", help="print the CustomResourceDefinitions")
    crds.add_argument("--write", action="store_true", help="write them to crds/ and the Helm chart instead")
    crds.add_argument("--root", type=Path, default=Path.cwd(), help="repository root for --write")
    return parser


def _configure_logging(fmt: str, level: str) -> None:
    from vllm_operator.observability import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # kopf logs every watch event at debug level; keep its info and above.
    logging.getLogger("kopf").setLevel(max(logging.INFO, logging.getLevelName(level.upper())))
    if level != "debug":
        # Per-event "handler succeeded" lines and health-probe access lines would drown the rest.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("kopf.activities.probe").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    import asyncio

    import kopf

    from vllm_operator import handlers
    from vllm_operator.kube import limit_tls_read_buffer
    from vllm_operator.leader import default_identity

    _configure_logging(args.log_format, args.log_level)
    limit_tls_read_buffer()
    handlers.OPTIONS.kubeconfig = args.kubeconfig
    handlers.OPTIONS.metrics_port = args.metrics_port
    handlers.OPTIONS.workers = args.workers
    handlers.OPTIONS.kube_qps = args.kube_api_qps
    handlers.OPTIONS.kube_burst = args.kube_api_burst
    handlers.OPTIONS.scrape_interval = args.scrape_interval
    handlers.OPTIONS.scrape_timeout = args.scrape_timeout
    handlers.OPTIONS.scrape_concurrency = args.scrape_concurrency
    handlers.OPTIONS.status_min_interval = args.status_min_interval
    handlers.OPTIONS.status_writes_per_second = args.status_writes_per_second
    if args.model_puller_image:
        handlers.OPTIONS.model_puller_image = args.model_puller_image
    if args.leader_elect:
        handlers.OPTIONS.leader_election_namespace = args.leader_election_namespace
        handlers.OPTIONS.leader_election_id = args.leader_election_id
        handlers.OPTIONS.identity = default_identity()
    kopf.run(
        namespaces=args.namespaces,
        clusterwide=not args.namespaces,
        # Never kopf's peering: it pauses only the watches, not our workers (the Lease decides who works).
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
        stop_flag=handlers.WORK_FAILED,
        memories=handlers.EventMemories(),
        loop=asyncio.new_event_loop(),
    )
    return 1 if handlers.WORK_FAILED.is_set() else 0


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import asyncio
    import json
    import time
    import uuid

    from pydantic import ValidationError

    from vllm_operator import api, kubeconfig
    from vllm_operator.benchmark import describe_request_error
    from vllm_operator.kube import Credentials, Kube, object_path

    fields = {"dataset": args.dataset, "datasetPath": args.dataset_path, "numPrompts": args.num_prompts,
              "requestRate": args.request_rate, "maxConcurrency": args.max_concurrency, "inputLen": args.input_len,
              "outputLen": args.output_len}
    request_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    try:
        request = api.BenchmarkRequest.model_validate({"id": request_id, **{k: v for k, v in fields.items()
                                                                             if v is not None}})
    except ValidationError as error:
        parser.error(describe_request_error(error))
    access = kubeconfig.from_kubeconfig(args.kubeconfig)
    namespace = args.namespace or access.namespace or "default"
    annotation = request.model_dump_json(by_alias=True, exclude_none=True)

    async def run() -> int:
        kube = Kube(Credentials.of(access, args.kubeconfig))
        try:
            await kube.request("PATCH", object_path(api.KIND, namespace, args.name),
                               body={"metadata": {"annotations": {api.BENCHMARK_ANNOTATION: annotation}}},
                               content_type="application/merge-patch+json")
            print(f"benchmark {request_id} requested for {namespace}/{args.name}")
            if not args.wait:
                return 0
            deadline, said = time.monotonic() + args.timeout, None
            while time.monotonic() < deadline:
                found = await kube.get(api.KIND, namespace, args.name)
                latest = (found.get("status") or {}).get("benchmark") or {}
                # A request queued after this one may have started already: this one's result is then the previous.
                status = latest if latest.get("id") == request_id else latest.get("previous") or latest
                if status.get("id") == request_id and status.get("message") != said:
                    said = status["message"]
                    print(f"{status['phase']}: {said}", file=sys.stderr)
                if status.get("id") == request_id and status.get("phase") in ("Succeeded", "Failed"):
                    print(json.dumps(status, indent=2))
                    return 0 if status["phase"] == "Succeeded" else 1
                await asyncio.sleep(2)
            print(f"benchmark {request_id} did not finish within {args.timeout:.0f}s", file=sys.stderr)
            return 1
        finally:
            await kube.close()

    return asyncio.run(run())


def _gateway(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from vllm_operator.gateway.server import serve
    from vllm_operator.gateway.watch import Fleet
    from vllm_operator.kube import Credentials, Kube, limit_tls_read_buffer

    _configure_logging(args.log_format, args.log_level)
    limit_tls_read_buffer()

    async def run() -> None:
        # SIGTERM (a Pod stopping) ends serve() through its cleanup, which lets requests in flight finish.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        # Each watch holds a connection for as long as it lasts: two per namespace, and room for the rest.
        watches = 2 * max(1, len(args.namespaces))
        kube = Kube(Credentials.load(args.kubeconfig), max_connections=watches + 8)
        try:
            await serve(Fleet(kube, tuple(args.namespaces) or None), args.host, args.port, args.wake_timeout)
        finally:
            await kube.close()

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.leader_elect and not args.leader_election_namespace:
        parser.error("--leader-elect needs --leader-election-namespace (or $POD_NAMESPACE)")
    if args.command == "crds":
        from vllm_operator.api import crd

        if args.write:
            for path in crd.write(args.root):
                print(f"wrote {path}")
        else:
            sys.stdout.write(crd.render())
        return 0
    if args.command == "bench":
        return _bench(args, parser)
    if args.command == "gateway":
        return _gateway(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
