"""The startup stage of a vLLM engine, read from the tail of its log.

vLLM serves nothing (not even /health) until it has loaded, profiled and warmed up, which takes from seconds
for a small model on a CPU to most of an hour for a large one on Gaudi cards. Its log is the only witness: each
stage begins with a line of its own. The markers are vLLM 0.32's messages; an engine that prints none of them
yet is ``Starting`` (Python imports, the engine process being spawned).
"""

from __future__ import annotations

import re
from typing import Literal

StartupStage = Literal["Starting", "LoadingWeights", "Profiling", "Compiling", "CapturingGraphs", "StartingServer"]

# (pattern, stage): the last marker in the log is the stage. vLLM 0.32's messages, from its model runners (the GPU
# one, which ROCm and the Intel GPU share, and the CPU one), its loaders, the compiler backend and the engine core.
# A GPU engine loads, compiles while it profiles memory, sizes the KV cache, captures graphs, then serves; a CPU
# engine warms up (compiles) before it sizes the KV cache.
_MARKERS: tuple[tuple[re.Pattern[str], StartupStage], ...] = tuple((re.compile(p), s) for p, s in (
    (r"Starting to load model|Loading safetensors checkpoint shards", "LoadingWeights"),
    (r"Loading weights took|Model loading took|Memory profiling takes|Available KV cache memory|"
     r"Explicitly set .* for KV cache|KV cache size: [0-9,]+ tokens", "Profiling"),
    (r"Dynamo bytecode transform time|Compiling a graph for|Warming up model for the compilation", "Compiling"),
    (r"Capturing CUDA graphs", "CapturingGraphs"),
    (r"Graph capturing finished|init engine \(profile, create kv cache, warmup model\) took|"
     r"Starting vLLM server on|Application startup complete", "StartingServer"),
))
# What the phase message says of each stage.
STAGE_WORDS: dict[StartupStage, str] = {
    "Starting": "starting",
    "LoadingWeights": "loading weights",
    "Profiling": "profiling memory",
    "Compiling": "compiling",
    "CapturingGraphs": "capturing graphs",
    "StartingServer": "starting the API server",
}
# Enough of a log's end to hold the latest marker: vLLM logs a few hundred lines while starting.
LOG_TAIL_LINES = 200
LOG_LIMIT_BYTES = 64 * 1024


def stage(log: str) -> StartupStage:
    """The stage the engine that wrote ``log`` is in: that of the last marker line."""
    for line in reversed(log.splitlines()):
        for pattern, marked in reversed(_MARKERS):
            if pattern.search(line):
                return marked
    return "Starting"
