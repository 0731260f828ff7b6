"""Where spec fields become the vLLM server's command line and environment.

Pure functions: an LLMDeployment spec in, container command/args/env out. Every flag emitted here
exists in the server of ``vllm_flags.VLLM_VERSION`` (``tests/test_engine_args.py`` walks many specs
to hold that true).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from vllm_operator.api import KeyRef, LLMDeploymentSpec, lora_enabled, parse_model_source, pulls_model
from vllm_operator.render.adapters import RUNTIME_UPDATES_ENV, lora_args
from vllm_operator.render.paths import CACHE_MOUNT, HF_HOME
from vllm_operator.render.profiles import CPU_KV_CACHE_SPACE_GIB_DEFAULT, AcceleratorProfile, profile_for

ENGINE_PORT = 8000
ENGINE_COMMAND = ("python3", "-m", "vllm.entrypoints.openai.api_server")
MODEL_MOUNT = "/models"
CHAT_TEMPLATE_MOUNT = "/etc/vllm/chat-template"
# The torch.compile caches live on the cache volume so restarts skip most compilation: vLLM's own,
# and inductor's, which would otherwise be in the container's /tmp and gone after a restart.
VLLM_CACHE_ROOT = f"{CACHE_MOUNT}/vllm"
TORCHINDUCTOR_CACHE_DIR = f"{VLLM_CACHE_ROOT}/torchinductor"
# vLLM closes an idle connection after 5 s by default. Proxies and load balancers keep idle upstream
# connections for up to 60 s and would race that close (a 502 now and then), and the operator's
# scraper could not reuse a connection from one scrape to the next.
ENGINE_KEEP_ALIVE_SECONDS = 75


@dataclass(frozen=True)
class EngineContainer:
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[dict, ...]


def engine_image(spec: LLMDeploymentSpec) -> str:
    """spec.engine.image, else the profile's image for the chosen backend."""
    profile = profile_for(spec.accelerator.type)
    if spec.engine.image is not None:
        return spec.engine.image
    if spec.engine.backend == "openvino" and profile.openvino_image is not None:
        return profile.openvino_image
    return profile.image


def served_model_name(spec: LLMDeploymentSpec, name: str) -> str:
    return spec.model.served_name or name


def model_argument(spec: LLMDeploymentSpec) -> str:
    """What --model gets: a repo id, or the path the weights are mounted at."""
    kind, _claim, path = parse_model_source(spec.model.name)
    if kind == "pvc":
        return f"{MODEL_MOUNT}/{path}".rstrip("/")
    return path


def parallel_sizes(spec: LLMDeploymentSpec) -> tuple[int, int]:
    """(tensor, pipeline) parallel degrees of one replica over all its nodes. Unset, a replica that spans nodes
    splits the usual way: tensor parallel inside a node, pipeline parallel across nodes."""
    engine, nodes = spec.engine, spec.accelerator.nodes
    per_node = spec.accelerator.devices or 1  # a CPU node runs one rank unless told otherwise
    tp, pp = engine.tensor_parallel_size, engine.pipeline_parallel_size
    if tp is None and pp is None:
        return per_node, nodes
    pp = pp or 1
    return tp or max(per_node * nodes // pp, 1), pp


def distributed_backend(spec: LLMDeploymentSpec) -> str | None:
    """--distributed-executor-backend: the spec's, else the profile's across nodes, else vLLM's own choice."""
    if spec.engine.distributed_backend is not None:
        return spec.engine.distributed_backend
    return profile_for(spec.accelerator.type).multinode_backend if spec.accelerator.nodes > 1 else None


def _flag(name: str, value: object) -> list[str]:
    return [] if value is None else [name, str(value)]


def _toggle(name: str, value: bool | None) -> list[str]:
    if value is None:
        return []
    return [f"--{name}" if value else f"--no-{name}"]


def _graph_args(spec: LLMDeploymentSpec, profile: AcceleratorProfile) -> list[str]:
    engine = spec.engine
    if engine.enforce_eager:
        return ["--enforce-eager"]
    if engine.cuda_graph is None or not profile.graph_capture:
        return []
    args = []
    if engine.cuda_graph.mode is not None:
        args += ["--compilation-config", json.dumps({"cudagraph_mode": engine.cuda_graph.mode}, separators=(",", ":"))]
    if engine.cuda_graph.capture_sizes:
        args += ["--cudagraph-capture-sizes", *map(str, engine.cuda_graph.capture_sizes)]
    return args


def engine_args(spec: LLMDeploymentSpec, name: str) -> list[str]:
    """The vLLM server arguments for an LLMDeployment called ``name``."""
    profile = profile_for(spec.accelerator.type)
    model, engine = spec.model, spec.engine
    args = [
        "--model", model_argument(spec),
        "--served-model-name", served_model_name(spec, name),
        "--host", "0.0.0.0",
        "--port", str(ENGINE_PORT),
    ]
    args += _flag("--revision", model.revision)
    args += _flag("--tokenizer", model.tokenizer)
    if model.trust_remote_code:
        args.append("--trust-remote-code")
    if model.chat_template_config_map_ref is not None:
        args += ["--chat-template", f"{CHAT_TEMPLATE_MOUNT}/{model.chat_template_config_map_ref.key}"]
    args += _flag("--chat-template", model.chat_template)
    args += _flag("--max-model-len", engine.max_model_len)
    args += _flag("--gpu-memory-utilization", engine.gpu_memory_utilization)
    args += _flag("--max-num-seqs", engine.max_num_seqs)
    args += _flag("--max-num-batched-tokens", engine.max_num_batched_tokens)
    tp, pp = parallel_sizes(spec)
    if profile.resource_name is not None or spec.accelerator.nodes > 1:
        args += ["--tensor-parallel-size", str(tp)]
    if pp > 1:
        args += ["--pipeline-parallel-size", str(pp)]
    args += _flag("--distributed-executor-backend", distributed_backend(spec))
    args += _flag("--dtype", engine.dtype)
    args += _flag("--quantization", engine.quantization)
    args += _flag("--load-format", engine.load_format)
    args += _flag("--kv-cache-dtype", engine.kv_cache_dtype)
    args += _flag("--block-size", engine.block_size or profile.default_block_size)
    args += _toggle("enable-prefix-caching", engine.enable_prefix_caching)
    args += _toggle("enable-chunked-prefill", engine.enable_chunked_prefill)
    args += _graph_args(spec, profile)
    args += lora_args(spec)
    return args + list(engine.extra_args)


def _secret_env(name: str, ref: KeyRef) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _openvino_env(spec: LLMDeploymentSpec, profile: AcceleratorProfile) -> dict[str, str]:
    """The OpenVINO backend reads its settings from these variables; unset ones keep its defaults."""
    env = {"VLLM_OPENVINO_DEVICE": profile.openvino_device or "CPU"}
    settings = spec.engine.openvino
    if settings is None:
        return env
    if settings.kv_cache_space_gi_b is not None:
        env["VLLM_OPENVINO_KVCACHE_SPACE"] = str(settings.kv_cache_space_gi_b)
    if settings.kv_cache_precision is not None:
        env["VLLM_OPENVINO_CPU_KV_CACHE_PRECISION"] = settings.kv_cache_precision
    if settings.enable_quantized_weights is not None:
        env["VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS"] = "ON" if settings.enable_quantized_weights else "OFF"
    return env


def engine_env(spec: LLMDeploymentSpec) -> list[dict]:
    """Environment of the engine container; spec.engine.env entries win over the operator's."""
    profile = profile_for(spec.accelerator.type)
    env: dict[str, dict] = {}

    def put(name: str, value: str) -> None:
        env[name] = {"name": name, "value": value}

    put("HF_HOME", HF_HOME)
    put("VLLM_CACHE_ROOT", VLLM_CACHE_ROOT)
    put("TORCHINDUCTOR_CACHE_DIR", TORCHINDUCTOR_CACHE_DIR)
    put("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(ENGINE_KEEP_ALIVE_SECONDS))
    put("VLLM_NO_USAGE_STATS", "1")
    put("DO_NOT_TRACK", "1")
    pulled = pulls_model(spec)
    if parse_model_source(spec.model.name)[0] != "hf" or pulled:
        # A download Job filled the cache before the engines started: no replica downloads again.
        put("HF_HUB_OFFLINE", "1")
    for key, value in profile.env.items():
        put(key, value)
    if spec.engine.backend == "openvino":
        for key, value in _openvino_env(spec, profile).items():
            put(key, value)
    elif spec.accelerator.type == "cpu":
        put("VLLM_CPU_KVCACHE_SPACE", str(spec.engine.cpu_kv_cache_space_gi_b or CPU_KV_CACHE_SPACE_GIB_DEFAULT))
    if spec.model.hf_token_secret_ref is not None and not pulled:  # else the download Job's alone
        env["HF_TOKEN"] = _secret_env("HF_TOKEN", spec.model.hf_token_secret_ref)
    if lora_enabled(spec):
        put(RUNTIME_UPDATES_ENV, "True")  # the operator loads spec.adapters at run time
    if spec.api_key_secret_ref is not None:
        env["VLLM_API_KEY"] = _secret_env("VLLM_API_KEY", spec.api_key_secret_ref)
    for var in spec.engine.env:
        env[var.name] = var.model_dump(by_alias=True, exclude_none=True)
    return list(env.values())


def engine_container(spec: LLMDeploymentSpec, name: str) -> EngineContainer:
    return EngineContainer(ENGINE_COMMAND, tuple(engine_args(spec, name)), tuple(engine_env(spec)))
