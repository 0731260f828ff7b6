"""The gateway on the local cluster, spoken to with the `openai` package as users would.

LLMDeployments are real objects in the apiserver; their engine Pods are made here, Ready on a kwok
node and answered by the simulated engines (devcluster.simengines) in this process, on a port of their
own. The LLMDeployments ask for a GPU no node has, so an operator that other tests run at the same time
creates only Pods that never become Ready, and this module's Pods are the only ones the gateway routes to.
The gateway runs as `vllm-operator gateway`, in its own process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

import llmd
from devcluster.cluster import client_kubeconfig
from devcluster.operatorproc import free_port
from devcluster.pytest_plugin import Cluster, wait_for
from devcluster.simengines import METRICS_FILE, WORDS, Engines, MetricsBody
from vllm_operator.render.manifests import SELECTOR_LABEL

pytestmark = pytest.mark.cluster

WAKE_TIMEOUT = 30
SYSTEM = "You are the billing team's assistant. Answer in one short sentence, in English. " * 4


class SimulatedEngines:
    """Simulated engines on their own event loop, in a thread, listening on one port of every Pod IP."""

    def __init__(self) -> None:
        self.engines = Engines("127.64.0.0/16", MetricsBody(METRICS_FILE.read_text()), "idle", port=free_port())
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def serve(self, ip: str) -> None:
        asyncio.run_coroutine_threadsafe(self.engines.serve(ip), self.loop).result(10)

    def close(self) -> None:
        async def forget_all() -> None:
            await asyncio.gather(*(self.engines.forget(ip) for ip in list(self.engines.sites)))

        asyncio.run_coroutine_threadsafe(forget_all(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def engines() -> Iterator[SimulatedEngines]:
    sim = SimulatedEngines()
    try:
        yield sim
    finally:
        sim.close()


@pytest.fixture(scope="module")
def space(cluster: Cluster, crd_installed: None) -> Iterator[str]:
    """The namespace of this module's LLMDeployments, the one the gateway serves."""
    name = f"t-gateway-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(cluster.api_client)
    core.create_namespace({"metadata": {"name": name, "labels": {"vllm-operator.io/test": "true"}}})
    try:
        wait_for("the default ServiceAccount", lambda: core.list_namespaced_service_account(name).items, 30)
        yield name
    finally:
        core.delete_namespace(name)


class GatewayProcess:
    def __init__(self, cluster: Cluster, namespace: str, log_file: Path, wake_timeout: float = WAKE_TIMEOUT) -> None:
        self.port = free_port()
        self.log_file = log_file
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm_operator.cli", "gateway", "--kubeconfig", str(client_kubeconfig(cluster.kubeconfig, "gateway")),
             "--namespace", namespace, "--host", "127.0.0.1", "--port", str(self.port),
             "--wake-timeout", str(wake_timeout), "--log-format", "text"],
            stdout=log_file.open("wb"), stderr=subprocess.STDOUT)
        wait_for("the gateway ready", self._ready, 30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.log()
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def log(self) -> str:
        return self.log_file.read_text()

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())

    def client(self, api_key: str = "unused", timeout: float = 60) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, space: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(cluster, space, tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        yield process
    finally:
        process.stop()


def deployment(name: str, served: str, replicas: int, **spec: Any) -> dict[str, Any]:
    """An LLMDeployment whose own Pods never schedule (no node has the GPU), so only ours serve it."""
    return {"apiVersion": "llm.vllm-operator.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name},
            "spec": {"model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "servedName": served},
                     "accelerator": {"type": "nvidia", "product": "No-Such-GPU"}, "replicas": replicas,
                     "cache": {"enabled": False}, **spec}}


def engine_pod(cluster: Cluster, sim: SimulatedEngines, namespace: str, owner: str, index: int,
               serve: bool = True, component: str = "engine") -> str:
    """A Ready engine Pod of ``owner`` on a kwok node, answered by ``sim`` unless ``serve`` is False; its IP.

    It joins ``owner`` (gets its label) only once the engine listens, as a real one does when it turns Ready."""
    core = client.CoreV1Api(cluster.api_client)
    name = f"{owner}-engine-{index}"
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": name},
        "spec": {"nodeName": "cpu-0", "containers": [{
            "name": "vllm", "image": "vllm/vllm-openai",
            "ports": [{"name": "http", "containerPort": sim.engines.port}]}]}})

    def ready_ip() -> str | None:
        status = core.read_namespaced_pod(name, namespace).status
        ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
        return status.pod_ip if ready else None

    ip = wait_for(f"pod {name} Ready", ready_ip, 30)
    if serve:
        sim.serve(ip)
    core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": {
        SELECTOR_LABEL: owner, "app.kubernetes.io/component": component}}})
    return ip


def wait_routable(gateway: GatewayProcess, model: str, replicas: int) -> None:
    """Until the gateway lists ``model`` with ``replicas`` Ready replicas."""
    def listed() -> bool:
        models = {m.id: m for m in gateway.client().models.list()}
        return model in models and (models[model].model_extra or {}).get("ready_replicas") == replicas

    wait_for(f"the gateway routing {model} to {replicas} replicas", listed, 20)


def fingerprint(answer: Any) -> str:
    return str(answer.system_fingerprint).removeprefix("sim-")


@pytest.fixture(scope="module")
def two_models(cluster: Cluster, engines: SimulatedEngines, space: str, gateway: GatewayProcess) -> dict[str, set[str]]:
    """chat-a (LeastLoad) and chat-b (PrefixHash), two Ready replicas each; their engine IPs."""
    ips: dict[str, set[str]] = {}
    for name, served, strategy in (("model-a", "chat-a", "LeastLoad"), ("model-b", "chat-b", "PrefixHash")):
        llmd.create(cluster.api_client, space, deployment(name, served, 2, routing={"strategy": strategy}))
        ips[served] = {engine_pod(cluster, engines, space, name, i) for i in range(2)}
        wait_routable(gateway, served, 2)
    return ips


def test_one_client_lists_both_models_and_chats_with_each_streamed_and_not(
        gateway: GatewayProcess, two_models: dict[str, set[str]], space: str) -> None:
    openai_client = gateway.client()
    listed = {m.id: m.model_extra for m in openai_client.models.list()}
    assert {"chat-a", "chat-b"} <= set(listed)
    assert listed["chat-a"]["namespace"] == space and listed["chat-a"]["llmdeployment"] == "model-a"
    assert (listed["chat-a"]["routing"], listed["chat-b"]["routing"]) == ("LeastLoad", "PrefixHash")
    for model in ("chat-a", "chat-b"):
        answer = openai_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello?"}], max_tokens=5)
        assert answer.choices[0].message.content == " ".join(WORDS[:5])
        assert fingerprint(answer) in two_models[model]
        stream = openai_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello?"}], max_tokens=7, stream=True)
        pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
        assert "".join(p or "" for p in pieces) == " ".join(WORDS[:7])
        assert len(pieces) >= 7, "the chunks arrive as the engine sent them, not gathered into one"
    completion = openai_client.completions.create(model="chat-a", prompt="Once", max_tokens=3)
    assert completion.choices[0].text == " ".join(WORDS[:3])
    embedding = openai_client.embeddings.create(model="chat-b", input=["a", "b"])
    assert len(embedding.data) == 2


def test_least_load_shares_an_idle_pair_and_prefix_hash_keeps_a_system_prompt_on_one_replica(
        gateway: GatewayProcess, two_models: dict[str, set[str]]) -> None:
    openai_client = gateway.client()

    def ask(model: str, system: str, question: str) -> str:
        return fingerprint(openai_client.chat.completions.create(
            model=model, max_tokens=2,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}]))

    assert {ask("chat-a", SYSTEM, f"question {i}") for i in range(6)} == two_models["chat-a"]
    assert len({ask("chat-b", SYSTEM, f"question {i}") for i in range(6)}) == 1
    others = {ask("chat-b", f"{i}: a system prompt of another team, with its own words.", "hi") for i in range(12)}
    assert others == two_models["chat-b"], "different prompts spread over both replicas"


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_errors_have_openai_shapes(cluster: Cluster, gateway: GatewayProcess, two_models: dict[str, set[str]],
                                   space: str) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        gateway.client().chat.completions.create(model="chat-aa", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.status_code == 404
    assert unknown.value.code == "model_not_found" and "'chat-a'" in unknown.value.message

    status, _, body = _post(f"{gateway.url}/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error", body

    llmd.create(cluster.api_client, space, deployment("model-loading", "loading", 1))
    wait_for("the gateway lists loading", lambda: "loading" in {m.id for m in gateway.client().models.list()}, 20)
    status, headers, body = _post(f"{gateway.url}/v1/chat/completions",
                                  json.dumps({"model": "loading", "messages": []}).encode())
    assert status == 503 and int(headers["Retry-After"]) > 0, (status, headers, body)
    assert body["error"]["code"] == "no_ready_replica", body


def test_an_api_key_is_required_where_the_llmdeployment_has_one(
        cluster: Cluster, engines: SimulatedEngines, gateway: GatewayProcess, space: str) -> None:
    key = f"sk-{uuid.uuid4().hex}"
    client.CoreV1Api(cluster.api_client).create_namespaced_secret(
        space, {"metadata": {"name": "keyed-key"}, "stringData": {"key": key}})
    llmd.create(cluster.api_client, space, deployment("keyed", "keyed", 1,
                                                      apiKeySecretRef={"name": "keyed-key", "key": "key"}))
    engine_pod(cluster, engines, space, "keyed", 0)
    wait_routable(gateway, "keyed", 1)

    with pytest.raises(openai.AuthenticationError) as wrong:
        gateway.client("sk-wrong").chat.completions.create(model="keyed", messages=[{"role": "user", "content": "x"}])
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    status, _, body = _post(f"{gateway.url}/v1/chat/completions",
                            json.dumps({"model": "keyed", "messages": []}).encode())
    assert status == 401 and body["error"]["code"] == "invalid_api_key", body
    answer = gateway.client(key).chat.completions.create(model="keyed", messages=[{"role": "user", "content": "x"}],
                                                         max_tokens=1)
    assert answer.choices[0].message.content == WORDS[0]
    assert key not in gateway.log()


def test_a_request_wakes_a_model_from_zero_once_for_all_who_wait(
        cluster: Cluster, engines: SimulatedEngines, gateway: GatewayProcess, space: str) -> None:
    llmd.create(cluster.api_client, space, deployment("sleeper", "sleeper", 0))
    wait_for("the gateway lists sleeper", lambda: "sleeper" in {m.id for m in gateway.client().models.list()}, 20)

    def ask(_: int) -> str:
        answer = gateway.client().chat.completions.create(
            model="sleeper", messages=[{"role": "user", "content": "wake up"}], max_tokens=2)
        return str(answer.choices[0].message.content)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = [pool.submit(ask, i) for i in range(5)]
        # Here the test plays the operator: the scale-up it sees brings a Ready engine.
        wait_for("the gateway scaling sleeper to 1", lambda: (
            (llmd.get(cluster.api_client, space, "sleeper") or {})["spec"].get("replicas") == 1), WAKE_TIMEOUT)
        engine_pod(cluster, engines, space, "sleeper", 0)
        assert [a.result(WAKE_TIMEOUT) for a in answers] == [" ".join(WORDS[:2])] * 5
    assert gateway.metric("vllm_gateway_wakes_total", model="sleeper") == 1
    assert gateway.metric("vllm_gateway_wake_wait_seconds_count", model="sleeper") == 5


def test_a_refused_connection_is_retried_on_another_replica(
        cluster: Cluster, engines: SimulatedEngines, gateway: GatewayProcess, space: str) -> None:
    llmd.create(cluster.api_client, space, deployment("flaky", "flaky", 2))
    alive = engine_pod(cluster, engines, space, "flaky", 0)
    engine_pod(cluster, engines, space, "flaky", 1, serve=False)  # Ready, but nothing listens
    wait_routable(gateway, "flaky", 2)
    answers = {fingerprint(gateway.client().chat.completions.create(
        model="flaky", messages=[{"role": "user", "content": "x"}], max_tokens=1)) for _ in range(6)}
    assert answers == {alive}
    assert gateway.metric("vllm_gateway_retries_total", model="flaky") >= 1


def test_only_engine_pods_get_requests_not_the_benchmark_pods_of_the_same_llmdeployment(
        cluster: Cluster, engines: SimulatedEngines, gateway: GatewayProcess, space: str) -> None:
    llmd.create(cluster.api_client, space, deployment("measured", "measured", 1))
    serving = engine_pod(cluster, engines, space, "measured", 0)
    engine_pod(cluster, engines, space, "measured", 1, component="benchmark")
    wait_routable(gateway, "measured", 1)
    answers = {fingerprint(gateway.client().chat.completions.create(
        model="measured", messages=[{"role": "user", "content": "x"}], max_tokens=1)) for _ in range(4)}
    assert answers == {serving}


def test_a_client_that_leaves_mid_stream_cancels_the_engines_request(
        engines: SimulatedEngines, gateway: GatewayProcess, two_models: dict[str, set[str]]) -> None:
    engines.engines.token_delay = 0.05
    before = gateway.metric("vllm_gateway_requests_total", model="chat-a", code="499")
    try:
        stream = gateway.client().chat.completions.create(
            model="chat-a", messages=[{"role": "user", "content": "tell me a long story"}], max_tokens=2000,
            stream=True)
        chunks = iter(stream)
        ip = fingerprint(next(chunks))
        next(chunks)
        stream.close()
        wait_for(f"the engine {ip} seeing its stream aborted", lambda: engines.engines.aborted.get(ip), 10)
        assert gateway.metric("vllm_gateway_requests_total", model="chat-a", code="499") == before + 1
    finally:
        engines.engines.token_delay = 0.0


def test_an_engine_dying_mid_stream_ends_the_stream_with_an_error_and_the_other_replica_serves_on(
        cluster: Cluster, engines: SimulatedEngines, gateway: GatewayProcess, space: str) -> None:
    llmd.create(cluster.api_client, space, deployment("fragile", "fragile", 2))
    ips = {engine_pod(cluster, engines, space, "fragile", i) for i in range(2)}
    wait_routable(gateway, "fragile", 2)
    engines.engines.token_delay = 0.05
    try:
        stream = gateway.client().chat.completions.create(
            model="fragile", messages=[{"role": "user", "content": "a long story"}], max_tokens=2000, stream=True)
        chunks = iter(stream)
        dead = fingerprint(next(chunks))
        asyncio.run_coroutine_threadsafe(engines.engines.kill(dead), engines.loop).result(10)
        with pytest.raises(openai.APIError):
            for _ in chunks:
                pass
    finally:
        engines.engines.token_delay = 0.0
    (alive,) = ips - {dead}
    answers = {fingerprint(gateway.client().chat.completions.create(
        model="fragile", messages=[{"role": "user", "content": "x"}], max_tokens=1)) for _ in range(4)}
    assert answers == {alive}


def test_metrics_count_requests_by_model_and_code(gateway: GatewayProcess, two_models: dict[str, set[str]]) -> None:
    before = gateway.metric("vllm_gateway_requests_total", model="chat-a", code="200")
    gateway.client().chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "x"}],
                                             max_tokens=1)
    assert gateway.metric("vllm_gateway_requests_total", model="chat-a", code="200") == before + 1
    assert gateway.metric("vllm_gateway_time_to_first_byte_seconds_count", model="chat-a") >= 1
    assert gateway.metric("vllm_gateway_requests_in_flight", model="chat-a") == 0
