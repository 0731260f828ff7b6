"""Startup stages: read from a real vLLM 0.32 start on the CPU, and from the GPU runner's messages."""

from __future__ import annotations

import asyncio
from pathlib import Path

from vllm_operator.engines.monitor import LOG_READS_PER_SWEEP, EngineMonitor
from vllm_operator.engines.startup import StartupStage, stage
from vllm_operator.kube import KubeError
from vllm_operator.reconcile.controller import Key
from vllm_operator.reconcile.status import Observation, compute_status

CPU_START = Path(__file__).parent / "data" / "engine-logs" / "vllm-0.32.0-cpu-start.log"


def stages_through(lines: list[str]) -> list[StartupStage]:
    """The stages a reader sees as the log grows line by line, each once in a row."""
    seen: list[StartupStage] = []
    for end in range(len(lines) + 1):
        now = stage("\n".join(lines[:end]))
        if not seen or seen[-1] != now:
            seen.append(now)
    return seen


def test_a_real_cpu_engine_start_goes_through_load_warm_up_kv_cache_and_server() -> None:
    # The CPU runner warms up (compiles) after loading, then sizes the KV cache, then the API server starts.
    assert stages_through(CPU_START.read_text().splitlines()) == [
        "Starting", "LoadingWeights", "Profiling", "Compiling", "Profiling", "StartingServer"]


def test_a_gpu_engine_start_reaches_each_stage_in_vllms_order() -> None:
    # The GPU model runner's, the compiler backend's and the engine core's messages, in the order vLLM 0.32
    # prints them.
    lines = [
        "(EngineCore pid=1) INFO 12-01 10:00:00 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: ...",
        "(Worker pid=2) INFO 12-01 10:00:05 [gpu_model_runner.py:5040] Starting to load model meta-llama/Llama-3.1-8B...",
        "(Worker pid=2) INFO 12-01 10:01:05 [default_loader.py:502] Loading weights took 58.21 seconds",
        "(Worker pid=2) INFO 12-01 10:01:06 [gpu_model_runner.py:5150] Model loading took 14.99 GiB memory and 60.1 "
        "seconds",
        "(Worker pid=2) INFO 12-01 10:01:20 [backends.py:1167] Dynamo bytecode transform time: 9.87 s",
        "(Worker pid=2) INFO 12-01 10:01:50 [backends.py:399] Compiling a graph for compile range (1, 8192) takes "
        "28.13 s",
        "(Worker pid=2) INFO 12-01 10:01:58 [gpu_worker.py:760] Available KV cache memory: 52.11 GiB",
        "(EngineCore pid=1) INFO 12-01 10:01:58 [kv_cache_utils.py:2327] GPU KV cache size: 426,880 tokens",
        "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 67/67 [00:12<00:00,  5.31it/s]",
        "(Worker pid=2) INFO 12-01 10:02:12 [gpu_model_runner.py:6582] Graph capturing finished in 14 secs, "
        "took 0.53 GiB",
        "(APIServer pid=0) INFO 12-01 10:02:15 [entry.py:140] Starting vLLM server on http://0.0.0.0:8000",
    ]
    assert stages_through(lines) == [
        "Starting", "LoadingWeights", "Profiling", "Compiling", "Profiling", "CapturingGraphs", "StartingServer"]


def test_lines_without_a_marker_keep_the_last_stage() -> None:
    log = "Starting to load model x...\nsome warning\n" + "progress line\n" * 500
    assert stage(log) == "LoadingWeights"
    assert stage("") == "Starting"


def test_the_loading_phase_names_each_replicas_stage() -> None:
    pod = {"metadata": {"name": "llama-0"}, "status": {"phase": "Running"}}
    startup = {"replicas": [{"pod": "llama-0", "stage": "LoadingWeights", "since": "2026-12-01T10:00:05Z"}]}
    status = compute_status(Observation("llama", "ai", 1, 1, pods=[pod], startup=startup), {}, "2026-12-01T10:01:00Z")
    assert status["phase"] == "Loading"
    assert status["startup"] == startup
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == "the engines are starting: pod llama-0 loading weights since 2026-12-01T10:00:05Z"


class StartingController:
    def __init__(self, starting: dict[Key, list[str]]) -> None:
        self.starting = starting
        self.stages: dict[Key, dict[str, StartupStage]] = {}

    def scrape_targets(self) -> dict[Key, dict[str, str]]:
        return {}

    def update_engine(self, *_: object) -> None:
        pass

    def starting_pods(self) -> dict[Key, list[str]]:
        return self.starting

    def update_startup(self, key: Key, stages: dict[str, StartupStage]) -> None:
        self.stages[key] = stages


def test_the_monitor_reads_the_least_recently_read_logs_first_and_keeps_a_stage_it_cannot_reread() -> None:
    key = ("ai", "llama")
    pods = [f"llama-{i}" for i in range(LOG_READS_PER_SWEEP + 5)]
    controller = StartingController({key: pods})
    reads: list[str] = []
    refuse = {"llama-0"}

    async def logs(namespace: str, pod: str) -> str:
        reads.append(pod)
        if pod in refuse and len(reads) > LOG_READS_PER_SWEEP:
            raise KubeError(503, "the kubelet is busy")
        return "Starting to load model x..." if pod != "llama-1" else "Capturing CUDA graphs"

    async def body() -> None:
        monitor = EngineMonitor(controller, interval=1.0, timeout=1.0, concurrency=4, logs=logs)
        try:
            await monitor.sweep()
            first = list(reads)
            await monitor.sweep()
            second = reads[len(first):]
        finally:
            await monitor.close()
        assert len(first) == LOG_READS_PER_SWEEP and len(second) == LOG_READS_PER_SWEEP
        assert set(pods) - set(first) <= set(second), "the replicas not read yet go first"

    asyncio.run(body())
    stages = controller.stages[key]
    assert stages["llama-1"] == "CapturingGraphs" and stages["llama-0"] == "LoadingWeights"
    assert set(stages) == set(pods)


def test_replicas_that_started_or_went_leave_the_startup_stages() -> None:
    key = ("ai", "llama")
    controller = StartingController({key: ["a", "b"]})

    async def logs(namespace: str, pod: str) -> str:
        return "Starting to load model x..."

    async def body() -> None:
        monitor = EngineMonitor(controller, interval=1.0, timeout=1.0, concurrency=4, logs=logs)
        try:
            await monitor.sweep()
            assert controller.stages[key] == {"a": "LoadingWeights", "b": "LoadingWeights"}
            controller.starting = {key: ["a"]}
            await monitor.sweep()
            assert controller.stages[key] == {"a": "LoadingWeights"}
            controller.starting = {}
            await monitor.sweep()
            assert controller.stages[key] == {}
        finally:
            await monitor.close()

    asyncio.run(body())


def test_a_replica_past_its_startup_probe_leaves_the_stages_before_the_logs_are_read_again() -> None:
    # The stages come from a log reader that runs once per scrape; the Pod that started (and turned Ready) in
    # between must not stay listed next to a Ready phase.
    started = {"metadata": {"name": "llama-0"}, "status": {
        "phase": "Running", "containerStatuses": [{"started": True, "state": {"running": {}}}],
        "conditions": [{"type": "Ready", "status": "True"}]}}
    starting = {"metadata": {"name": "llama-1"}, "status": {
        "phase": "Running", "containerStatuses": [{"started": False, "state": {"running": {}}}]}}
    startup = {"replicas": [{"pod": "llama-0", "stage": "StartingServer", "since": "2026-12-01T10:00:05Z"},
                            {"pod": "llama-1", "stage": "LoadingWeights", "since": "2026-12-01T10:00:05Z"}]}
    status = compute_status(Observation("llama", "ai", 1, 2, pods=[started, starting], startup=startup), {},
                            "2026-12-01T10:01:00Z")
    assert status["startup"] == {"replicas": [startup["replicas"][1]]}
    status = compute_status(Observation("llama", "ai", 1, 1, pods=[started], startup=startup), {},
                            "2026-12-01T10:01:00Z")
    assert status["phase"] == "Ready"
    assert "startup" not in status
