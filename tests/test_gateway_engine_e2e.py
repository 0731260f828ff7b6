"""The gateway in front of real vLLM on the local-runtime node: two replicas of the tiny model chatted with
through one OpenAI client, streamed and not; PrefixHash against LeastLoad on shared system prompts, by the
engines' own prefix cache counters; a second LLMDeployment at zero replicas woken by its first request; and an
engine killed mid-stream."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from kubernetes import client

import llmd
from devcluster import prefixload
from devcluster.operatorproc import OperatorProcess
from devcluster.prefill import prefill_model_cache
from devcluster.pytest_plugin import Cluster, wait_for
from test_gateway import GatewayProcess
from vllm_operator.engines.metrics import EngineSample, parse_sample

pytestmark = [pytest.mark.cluster, pytest.mark.engine]

# Loading the tiny model on a busy CPU node: the Pod starts, vLLM imports and compiles, then reports Ready.
LOAD_TIMEOUT = 420
# Two replicas load side by side, on the same cores.
PAIR_LOAD_TIMEOUT = 2 * LOAD_TIMEOUT
NAME = "tiny"
# The tiny model's whole context: long enough that a stream outlasts the kill on a fast machine.
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module")
def served(operator: OperatorProcess, cluster: Cluster) -> Iterator[str]:
    """A namespace where the tiny model is Ready on two replicas (examples/cpu-tiny.yaml, cache pre-filled)."""
    pair = llmd.example("cpu-tiny")
    pair["spec"]["replicas"] = 2
    pair["spec"]["cache"]["accessMode"] = "ReadWriteMany"
    pair["spec"]["engine"]["maxModelLen"] = MAX_MODEL_LEN
    with llmd.serving(cluster.api_client, "t-gateway-engine", pair, PAIR_LOAD_TIMEOUT) as namespace:
        yield namespace


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, served: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(cluster, served, tmp_path_factory.mktemp("gateway") / "gateway.log",
                             wake_timeout=LOAD_TIMEOUT)
    try:
        yield process
    finally:
        process.stop()


def test_one_client_chats_with_real_vllm_streamed_and_not(gateway: GatewayProcess) -> None:
    openai_client = gateway.client(timeout=120)
    assert NAME in {m.id for m in openai_client.models.list()}
    answer = openai_client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                                   max_tokens=8, extra_body={"ignore_eos": True})
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    # Tokens that end inside a UTF-8 character reach the client joined with the next, so chunks are not tokens.
    chunks = list(openai_client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def route_by(cluster: Cluster, namespace: str, openai_client: openai.OpenAI, strategy: str) -> None:
    llmd.patch_spec(cluster.api_client, namespace, NAME, {"routing": {"strategy": strategy}})
    wait_for(f"the gateway routing by {strategy}", lambda: next(
        m for m in openai_client.models.list() if m.id == NAME).model_extra["routing"] == strategy, 20)


def engine_metrics(pod: client.V1Pod) -> str:
    with urllib.request.urlopen(f"http://{pod.status.pod_ip}:8000/metrics", timeout=10) as answer:
        return answer.read().decode()


def engine_sample(pod: client.V1Pod) -> EngineSample:
    return parse_sample(engine_metrics(pod), 0.0)


def test_prefix_hash_finds_more_of_a_shared_prompt_in_cache_than_least_load(
        cluster: Cluster, served: str, gateway: GatewayProcess) -> None:
    openai_client = gateway.client(timeout=120)

    def counters() -> tuple[float, float]:
        return prefixload.prefix_counters(engine_metrics(pod) for pod in llmd.owned_pods(cluster.api_client, served, NAME))

    hit_percent: dict[str, float] = {}
    for strategy in ("LeastLoad", "PrefixHash"):
        route_by(cluster, served, openai_client, strategy)
        before = counters()
        for messages in prefixload.chats(strategy):
            openai_client.chat.completions.create(**prefixload.request_body(NAME, messages))
        hit_percent[strategy] = prefixload.hit_percent(before, counters())
    print(f"prefix cache hits, {prefixload.REQUESTS} requests of {prefixload.TEAMS} shared system prompts over "
          f"2 replicas: {hit_percent}")
    assert hit_percent["PrefixHash"] > hit_percent["LeastLoad"], hit_percent


def test_a_request_wakes_a_real_model_from_zero(cluster: Cluster, served: str, gateway: GatewayProcess) -> None:
    sleeper = llmd.example("cpu-tiny")
    sleeper["metadata"]["name"] = "tiny-sleeper"
    sleeper["spec"]["replicas"] = 0
    llmd.create(cluster.api_client, served, sleeper)
    prefill_model_cache(cluster.api_client, served, "tiny-sleeper")
    openai_client = gateway.client(timeout=LOAD_TIMEOUT)
    wait_for("the gateway listing tiny-sleeper", lambda: "tiny-sleeper" in {m.id for m in openai_client.models.list()},
             20)
    woken = openai_client.chat.completions.create(model="tiny-sleeper", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=4, extra_body={"ignore_eos": True})
    assert woken.usage is not None and woken.usage.completion_tokens == 4
    assert (llmd.get(cluster.api_client, served, "tiny-sleeper") or {})["spec"]["replicas"] == 1
    assert gateway.metric("vllm_gateway_wakes_total", model="tiny-sleeper") == 1


def test_an_engine_killed_mid_stream_ends_the_stream_with_an_error_and_the_other_serves_on(
        cluster: Cluster, served: str, gateway: GatewayProcess) -> None:
    openai_client = gateway.client(timeout=60)
    route_by(cluster, served, openai_client, "LeastLoad")

    def open_stream(i: int) -> Iterator[Any]:
        return iter(openai_client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"Tell me a long story, {i}."}],
            max_tokens=MAX_MODEL_LEN - 64, stream=True, extra_body={"ignore_eos": True}))

    # Six long streams opened at once, which LeastLoad spreads over both replicas. A fast CPU decodes the tiny
    # model's whole context in seconds, so the kill falls on a replica seen decoding, the moment it is seen.
    opening = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        streams = list(pool.map(open_stream, range(6)))
    opened = time.monotonic() - opening

    def decoding() -> client.V1Pod | None:
        return next((pod for pod in llmd.owned_pods(cluster.api_client, served, NAME)
                     if engine_sample(pod).requests_running), None)

    def engines_said() -> str:
        """What each engine's /metrics says of its requests: the evidence when none is seen decoding."""
        lines = [f"the six streams took {opened:.1f}s to open"]
        for pod in llmd.owned_pods(cluster.api_client, served, NAME):
            wanted = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:request_success_total",
                      "vllm:generation_tokens_total")
            lines += [f"{pod.metadata.name}: {line}" for line in engine_metrics(pod).splitlines()
                      if line.startswith(wanted)]
        return "\n".join(lines)

    doomed = wait_for("an engine decoding the streams", decoding, 30, 0.1, engines_said)
    os.kill(int(doomed.status.container_statuses[0].container_id.removeprefix("localruntime://")), signal.SIGKILL)

    def outcome(stream: Iterator[Any]) -> str:
        try:
            for _ in stream:
                pass
        except openai.APIError:
            return "error"
        return "complete"

    outcomes = [outcome(stream) for stream in streams]
    assert "error" in outcomes and "complete" in outcomes, outcomes
    # Until its readiness probe fails, the dead replica is still a candidate: a refused connection goes to the other.
    for _ in range(4):
        answer = openai_client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                                       max_tokens=2, extra_body={"ignore_eos": True})
        assert answer.usage is not None and answer.usage.completion_tokens == 2
