"""``make demo``: the whole user path on one machine, with real vLLM.

    python -m devcluster.demo up      # cluster, Helm chart, operator, Prometheus, tiny model, Ready, a chat completion
    python -m devcluster.demo down    # stop everything the demo started and remove .demo/

The demo keeps to itself: its own state folder (``.demo/``), ports (base 17400) and Pod range
(127.72.0.0/16), so it runs beside the test cluster; ``VLLM_OPERATOR_DEMO_DIR``,
``VLLM_OPERATOR_DEMO_PORT_BASE`` and ``VLLM_OPERATOR_DEMO_POD_CIDR`` move them. The operator runs as a local process under the chart's ServiceAccount,
so it has exactly the rights ``helm install`` grants on a real cluster. Prometheus (built by ``make binaries``)
scrapes the engines as the chart's PodMonitor would have it and the operator as its ServiceMonitor would, and
evaluates the chart's alert rules (see ``devcluster.monitoring``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from devcluster import binaries, engine, monitoring
from devcluster.cluster import REPO_ROOT, ClusterError, LocalCluster, Ports, Process
from devcluster.operatorproc import free_port, operator_command, operator_env, wait_healthy
from devcluster.prefill import prefill_model_cache
from devcluster.serviceaccount import service_account_kubeconfig
from vllm_operator import api
from vllm_operator.render.manifests import SELECTOR_LABEL

# Overridable so a test can run a second demo beside a user's.
DEMO_DIR = Path(os.environ.get("VLLM_OPERATOR_DEMO_DIR", REPO_ROOT / ".demo")).resolve()
PORT_BASE = int(os.environ.get("VLLM_OPERATOR_DEMO_PORT_BASE", "17400"))
POD_CIDR = os.environ.get("VLLM_OPERATOR_DEMO_POD_CIDR", "127.72.0.0/16")
RELEASE = "vllm-operator"
OPERATOR_NAMESPACE = "vllm-operator-system"
NAMESPACE = "default"
EXAMPLE = REPO_ROOT / "examples" / "cpu-tiny.yaml"
CHART = REPO_ROOT / "charts" / "vllm-operator"
# vLLM CPU with the tiny model and a 1 GiB KV cache peaks near 3 GiB; leave room for the rest.
MIN_AVAILABLE_GIB = 4.0
READY_TIMEOUT = 420.0
SCRAPE_INTERVAL = 5
# Prometheus' usual 9090 is taken by the cluster's simulated-engines port (base + 90).
PROMETHEUS_PORT = PORT_BASE + 91
HEARTBEAT_SECONDS = 10


class DemoError(RuntimeError):
    """What went wrong, in one line, and where to look."""


@dataclass
class Demo:
    state_dir: Path = DEMO_DIR
    out: Callable[[str], None] = field(default=lambda line: print(line, flush=True))

    def __post_init__(self) -> None:
        self.cluster = LocalCluster(self.state_dir / "cluster", Ports(PORT_BASE), POD_CIDR)
        self.operator = Process("operator", self.state_dir)
        self.prometheus = Process("prometheus", self.state_dir)
        self.started = time.monotonic()
        self.timings: list[tuple[str, float]] = []

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    # -- output --------------------------------------------------------------------------------

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        number = len(self.timings) + 1
        self.out(f"\n[{number}] {title}")
        began = time.monotonic()
        yield
        took = time.monotonic() - began
        self.timings.append((title, took))
        self.out(f"    done in {took:.1f}s")

    def kubectl(self, *args: str, show: bool = True) -> str:
        command = ["kubectl", "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise DemoError(f"`kubectl {' '.join(args)}` failed: {result.stderr.strip()}")
        if show:
            self.out(f"    $ kubectl {' '.join(args)}")
            for line in result.stdout.rstrip().splitlines():
                self.out(f"    {line}")
        return result.stdout

    # -- the steps -----------------------------------------------------------------------------

    def up(self) -> None:
        self.out("vllm-operator demo: a local cluster, the Helm chart, the operator, and a model served by real vLLM")
        with self.step("preflight: memory, cluster binaries, vLLM CPU engine, tiny model"):
            self._preflight()
        with self.step(f"local cluster (state in {self.cluster.state_dir})"):
            self.cluster.up(lambda line: self.out(f"    {line}"))
        api_client = self.cluster.api_client()
        with self.step(f"helm install {RELEASE} {CHART.relative_to(REPO_ROOT)}"):
            service_account = self._helm_install(api_client)
        with self.step(f"operator, authenticated as ServiceAccount {OPERATOR_NAMESPACE}/{service_account}"):
            metrics_port = self._start_operator(api_client, service_account)
        with self.step("Prometheus, scraping what the chart's PodMonitor and ServiceMonitor select"):
            prometheus_url = self._start_prometheus(metrics_port)
        name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
        with self.step(f"kubectl apply -f {EXAMPLE.relative_to(REPO_ROOT)} (and pre-fill its model cache)"):
            self.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLE))
            snapshot = prefill_model_cache(api_client, NAMESPACE, name)
            self.out(f"    tiny model copied into the cache claim: {snapshot}")
        with self.step(f"waiting for LLMDeployment {name} to be Ready"):
            self._wait_ready(api_client, name)
            self._wait_scraped(api_client, name)
            self.kubectl("get", "llmdeployments", "-n", NAMESPACE)
        with self.step("a chat completion through the OpenAI API"):
            pod_ip = self._pod_ip(api_client, name)
            self._chat(pod_ip, name)
        with self.step("the engine's and the operator's series in Prometheus"):
            self._wait_series(prometheus_url, name, metrics_port)
        self._summary(name, pod_ip, metrics_port, prometheus_url)

    def _preflight(self) -> None:
        available = _mem_available_gib()
        if available < MIN_AVAILABLE_GIB:
            raise DemoError(f"only {available:.1f} GiB of memory is available; the demo needs "
                            f"{MIN_AVAILABLE_GIB:.0f} GiB (vLLM CPU loads the model and a 1 GiB KV cache)")
        if shutil.which("kubectl") is None:
            raise DemoError("kubectl is not on PATH; install it (https://kubernetes.io/docs/tasks/tools/)")
        binaries.ensure()
        engine.ensure()
        engine.model()
        self.out(f"    {available:.1f} GiB available; binaries, engine and model are ready")

    def _helm_install(self, api_client: client.ApiClient) -> str:
        command = [str(binaries.path_of("helm")), "upgrade", "--install", RELEASE, str(CHART),
                   "--kubeconfig", str(self.kubeconfig), "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
                   # The operator runs as a local process below; no Pod would run on the simulated nodes.
                   "--set", "replicaCount=0", "--set", f"scrapeInterval={SCRAPE_INTERVAL}", "--wait", "--timeout", "2m"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise DemoError(f"helm install failed: {result.stderr.strip() or result.stdout.strip()}")
        self.out(f"    {result.stdout.strip().splitlines()[0] if result.stdout.strip() else 'installed'}")
        accounts = client.CoreV1Api(api_client).list_namespaced_service_account(
            OPERATOR_NAMESPACE, label_selector=f"app.kubernetes.io/instance={RELEASE}").items
        if not accounts:
            raise DemoError(f"the chart created no ServiceAccount in {OPERATOR_NAMESPACE}")
        return str(accounts[0].metadata.name)

    def _start_operator(self, api_client: client.ApiClient, service_account: str) -> int:
        kubeconfig = service_account_kubeconfig(api_client, self.kubeconfig, OPERATOR_NAMESPACE, service_account,
                                                self.state_dir / "operator.kubeconfig")
        if self.operator.pid() is not None:
            self.operator.stop()  # a rerun picks up the current code and a fresh token
        metrics_port, health_port = free_port(), free_port()
        command = operator_command(kubeconfig, metrics_port, health_port,
                                   ["--scrape-interval", str(SCRAPE_INTERVAL), "--log-format", "json"])
        popen = self.operator.start(command, operator_env())
        try:
            wait_healthy(popen, health_port, self.operator.log)
        except RuntimeError as exc:
            raise DemoError(str(exc)) from None
        self.out(f"    pid {popen.pid}, log {self.operator.log}, metrics http://127.0.0.1:{metrics_port}/metrics")
        return metrics_port

    def _start_prometheus(self, metrics_port: int) -> str:
        objects = monitoring.render(binaries.path_of("helm"), RELEASE, OPERATOR_NAMESPACE)
        folder = self.state_dir / "prometheus"
        folder.mkdir(parents=True, exist_ok=True)
        rules, config = folder / "rules.yaml", folder / "prometheus.yml"
        rules.write_text(yaml.safe_dump(monitoring.rule_file(objects), sort_keys=False))
        config.write_text(yaml.safe_dump(monitoring.prometheus_config(
            objects, self.kubeconfig, f"127.0.0.1:{metrics_port}", SCRAPE_INTERVAL, rules), sort_keys=False))
        if self.prometheus.pid() is not None:
            self.prometheus.stop()  # a rerun scrapes the new operator's port
        url = f"http://127.0.0.1:{PROMETHEUS_PORT}"
        popen = self.prometheus.start([
            str(binaries.path_of("prometheus")), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}", "--storage.tsdb.retention.time=1d"])
        deadline = time.monotonic() + 60
        while not _answers(f"{url}/-/ready"):
            if popen.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"Prometheus did not become ready: {self.prometheus.last_line()}; "
                                f"see {self.prometheus.log}")
            time.sleep(0.5)
        (self.state_dir / "demo.json").write_text(
            json.dumps({"metrics_port": metrics_port, "prometheus_url": url}) + "\n")
        self.out(f"    Prometheus: {url}  (pid {popen.pid}, config {config}, log {self.prometheus.log})")
        return url

    def _wait_ready(self, api_client: client.ApiClient, name: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        began, last, said = time.monotonic(), None, time.monotonic()
        while time.monotonic() < deadline:
            resource = _get(api_client, name) or {}
            status = resource.get("status") or {}
            ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
            seen = (status.get("phase"), ready.get("message"))
            elapsed = time.monotonic() - began
            if seen != last and seen[0]:
                self.out(f"    {elapsed:6.1f}s  phase {seen[0]:<9} {seen[1] or ''}")
                last, said = seen, time.monotonic()
            elif time.monotonic() - said >= HEARTBEAT_SECONDS:
                self.out(f"    {elapsed:6.1f}s  still {seen[0]}; engine log: {_last_line(self._engine_log(name))}")
                said = time.monotonic()
            if status.get("phase") == "Ready":
                return
            self._check_engine(api_client, name, status)
            time.sleep(1)
        raise DemoError(f"LLMDeployment {name} was not Ready after {READY_TIMEOUT:.0f}s; "
                        f"engine log: {self._engine_log(name)}")

    def _check_engine(self, api_client: client.ApiClient, name: str, status: dict[str, Any]) -> None:
        """Stop at the first sign that the engine cannot start, rather than wait out the timeout."""
        degraded = next((c for c in status.get("conditions") or [] if c["type"] == "Degraded"), {})
        if status.get("phase") == "Failed" or degraded.get("reason") in ("EngineExited", "EngineOOMKilled",
                                                                         "EngineCrashLooping"):
            reason = degraded.get("message") or status.get("phase")
            raise DemoError(f"the engine failed to start: {reason}; engine log: {self._engine_log(name)}")

    def _wait_scraped(self, api_client: client.ApiClient, name: str) -> None:
        deadline = time.monotonic() + 4 * SCRAPE_INTERVAL
        while time.monotonic() < deadline and "engine" not in ((_get(api_client, name) or {}).get("status") or {}):
            time.sleep(0.5)

    def _wait_series(self, url: str, name: str, metrics_port: int) -> None:
        # This run's operator only: a rerun's Prometheus still holds the previous operator's recent series.
        selector, operator = f'namespace="{NAMESPACE}", llmdeployment="{name}"', f'instance="127.0.0.1:{metrics_port}"'
        wanted = (f"vllm:num_requests_running{{{selector}}}",
                  f"vllm_operator_llmdeployment_phase{{{selector}, {operator}}}", f"vllm_operator_leader{{{operator}}}")
        deadline = time.monotonic() + 6 * SCRAPE_INTERVAL
        while missing := [expr for expr in wanted if not monitoring.query(url, expr)]:
            if time.monotonic() > deadline:
                raise DemoError(f"Prometheus has no {missing}; its targets: {url}/api/v1/targets")
            time.sleep(1)
        found = {expr: monitoring.query(url, expr) for expr in wanted}
        for expr, series in found.items():
            self.out(f"    $ curl -s '{url}/api/v1/query' --data-urlencode 'query={expr}'")
            for one in series:
                labels = ", ".join(f'{k}="{v}"' for k, v in sorted(one["metric"].items()) if k != "__name__")
                self.out(f"    {one['metric']['__name__']}{{{labels}}} {one['value'][1]}")

    def _pod_ip(self, api_client: client.ApiClient, name: str) -> str:
        pods = client.CoreV1Api(api_client).list_namespaced_pod(
            NAMESPACE, label_selector=f"{SELECTOR_LABEL}={name}").items
        ready = [p for p in pods if p.status.pod_ip and p.metadata.deletion_timestamp is None]
        if not ready:
            raise DemoError(f"no engine Pod of {name} has an IP")
        return str(ready[0].status.pod_ip)

    def _chat(self, pod_ip: str, model: str) -> None:
        from openai import OpenAI

        before = _generation_tokens(pod_ip)
        question = "What is Kubernetes?"
        self.out(f"    POST http://{pod_ip}:8000/v1/chat/completions  model={model}  \"{question}\"")
        answer = OpenAI(base_url=f"http://{pod_ip}:8000/v1", api_key="unused", timeout=60).chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=32)
        usage = answer.usage
        if usage is None or usage.completion_tokens <= 0:
            raise DemoError("the engine answered without generating tokens")
        after = _generation_tokens(pod_ip)
        text = " ".join((answer.choices[0].message.content or "").split())
        self.out(f"    answer (random weights, so expect nonsense): {text[:200]!r}")
        self.out(f"    usage: prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}; "
                 f"engine vllm:generation_tokens_total {before:.0f} -> {after:.0f}")
        if after <= before:
            raise DemoError("vllm:generation_tokens_total did not rise; the answer did not come from this engine")

    def _summary(self, name: str, pod_ip: str, metrics_port: int, prometheus_url: str) -> None:
        total = time.monotonic() - self.started
        self.out("\nStep timings:")
        for title, took in self.timings:
            self.out(f"  {took:7.1f}s  {title}")
        self.out(f"  {total:7.1f}s  total")
        self.out(f"""
The demo is still running. Try:
  export KUBECONFIG={self.kubeconfig}
  kubectl get llmd -w                      # live RUNNING, WAITING, KV%, TOK/S
  kubectl describe llmd {name}{" " * max(1, 24 - len(name))}# conditions and events
  curl -s http://{pod_ip}:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 16}}'
  curl -s http://127.0.0.1:{metrics_port}/metrics | grep vllm_operator   # the operator's own metrics
  curl -s {prometheus_url}/api/v1/query --data-urlencode 'query=vllm:num_requests_running'   # Prometheus
  make screenshot                          # the chart's dashboard, drawn from this Prometheus under load
  make demo-down                           # stop everything and remove .demo/""")

    # -- teardown ------------------------------------------------------------------------------

    def stop_processes(self) -> None:
        self.prometheus.stop()
        self.operator.stop()
        self.cluster.down(lambda line: None)

    def down(self) -> None:
        for process in (self.prometheus, self.operator):
            pid = process.stop()
            if pid is not None:
                self.out(f"stopped {process.name} (pid {pid})")
        self.cluster.down(self.out)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
            self.out(f"removed {self.state_dir}")

    def _engine_log(self, name: str) -> str:
        pods = sorted((self.cluster.state_dir / "localruntime" / "pods").glob(f"{NAMESPACE}_{name}-*/*.log"))
        return str(pods[-1]) if pods else str(self.cluster.state_dir / "logs" / "localruntime.log")


def _get(api_client: client.ApiClient, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
            api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return found


def _generation_tokens(pod_ip: str) -> float:
    with urllib.request.urlopen(f"http://{pod_ip}:8000/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "vllm:generation_tokens_total")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _last_line(path: str, limit: int = 110) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(not started yet)"
    return " ".join(lines[-1].split())[:limit] if lines else "(empty)"


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down"))
    args = parser.parse_args(argv)
    demo = Demo()
    if args.command == "down":
        demo.down()
        return 0
    try:
        demo.up()
    except (DemoError, ClusterError, binaries.BuildError, engine.EngineError) as exc:
        demo.stop_processes()
        print(f"\ndemo failed: {exc}\n(all demo processes stopped; logs stay in {demo.state_dir} until "
              "`make demo-down`)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        demo.stop_processes()
        print("\ninterrupted; all demo processes stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
