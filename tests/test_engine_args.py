"""The spec -> vLLM command line mapping, checked against vLLM's real argument list."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.render.engine_args import engine_args, engine_env
from vllm_operator.engines.scrape import KEEPALIVE_SECONDS
from vllm_operator.render.vllm_flags import REMOVED_FLAGS, catalog, extra_args_errors


def spec(**overrides: Any) -> LLMDeploymentSpec:
    body: dict[str, Any] = {"model": {"name": "meta-llama/Meta-Llama-3-8B-Instruct"}, "accelerator": {"type": "nvidia"}}
    body.update(overrides)
    return LLMDeploymentSpec.model_validate(body)


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


ENGINE_VARIANTS = [
    {},
    {"maxModelLen": 8192, "gpuMemoryUtilization": 0.9, "maxNumSeqs": 256, "maxNumBatchedTokens": 8192},
    {"dtype": "bfloat16", "quantization": "awq", "loadFormat": "safetensors", "kvCacheDtype": "fp8"},
    {"blockSize": 32, "enablePrefixCaching": False, "enableChunkedPrefill": True},
    {"enforceEager": True},
    {"cudaGraph": {"mode": "FULL_AND_PIECEWISE", "captureSizes": [1, 2, 4, 8, 16, 32, 64]}},
    {"pipelineParallelSize": 2},
    {"extraArgs": ["--enable-auto-tool-choice", "--tool-call-parser=hermes", "--seed", "7"]},
]
MODEL_VARIANTS = [
    {"name": "mistralai/Mistral-7B-Instruct-v0.3", "revision": "main", "servedName": "mistral"},
    {"name": "pvc://weights/llama/8b", "tokenizer": "meta-llama/Meta-Llama-3-8B", "trustRemoteCode": True},
    {"name": "file:///models/tiny", "chatTemplate": "{{ messages }}"},
    {"name": "gpt2", "chatTemplateConfigMapRef": {"name": "templates", "key": "chat.jinja"}},
]
ACCELERATORS = [
    {"type": "nvidia", "count": 2},
    {"type": "amd", "count": 4},
    {"type": "gaudi", "count": 8},
    {"type": "intel-gpu", "count": 2},
    {"type": "cpu"},
]


def _valid_combinations() -> list[LLMDeploymentSpec]:
    specs = []
    for model, accelerator, engine in itertools.product(MODEL_VARIANTS, ACCELERATORS, ENGINE_VARIANTS):
        if "cudaGraph" in engine and accelerator["type"] not in ("nvidia", "amd"):
            continue
        specs.append(LLMDeploymentSpec.model_validate(
            {"model": model, "accelerator": accelerator, "engine": engine, "apiKeySecretRef": {"name": "k", "key": "key"}}
        ))
    return specs


def test_every_emitted_flag_exists_in_vllm() -> None:
    known = catalog()
    specs = _valid_combinations()
    assert len(specs) > 100
    for one in specs:
        for flag in flags_of(engine_args(one, "llm")):
            assert flag in known, f"{flag} is not a vLLM {known.version} flag"


def test_flags_the_catalog_knows_match_the_captured_parser() -> None:
    known = catalog()
    assert {"--model", "--served-model-name", "--tensor-parallel-size", "-tp", "--no-enable-prefix-caching"} <= set(known.aliases)
    for removed in REMOVED_FLAGS:
        assert removed not in known, f"{removed} exists in vLLM {known.version}; it is not removed"


def test_core_flags_and_defaults() -> None:
    args = engine_args(spec(accelerator={"type": "nvidia", "count": 4}, engine={"maxModelLen": 4096}), "llama")
    assert args[:8] == ["--model", "meta-llama/Meta-Llama-3-8B-Instruct", "--served-model-name", "llama",
                        "--host", "0.0.0.0", "--port", "8000"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert args[args.index("--max-model-len") + 1] == "4096"


def test_tensor_parallel_default_divides_by_pipeline_stages() -> None:
    args = engine_args(spec(accelerator={"type": "nvidia", "count": 8}, engine={"pipelineParallelSize": 2}), "x")
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert args[args.index("--pipeline-parallel-size") + 1] == "2"


def test_cpu_has_no_tensor_parallel_flag_and_sets_kv_cache_space() -> None:
    one = spec(accelerator={"type": "cpu"}, engine={"cpuKVCacheSpaceGiB": 2})
    assert "--tensor-parallel-size" not in engine_args(one, "x")
    env = {e["name"]: e for e in engine_env(one)}
    assert env["VLLM_CPU_KVCACHE_SPACE"]["value"] == "2"


def test_cuda_graph_knobs_map_to_compilation_config_and_capture_sizes() -> None:
    args = engine_args(spec(engine={"cudaGraph": {"mode": "FULL_AND_PIECEWISE", "captureSizes": [1, 2, 4]}}), "x")
    config = json.loads(args[args.index("--compilation-config") + 1])
    assert config == {"cudagraph_mode": "FULL_AND_PIECEWISE"}
    start = args.index("--cudagraph-capture-sizes")
    assert args[start + 1:start + 4] == ["1", "2", "4"]


def test_enforce_eager_wins_over_cuda_graph() -> None:
    args = engine_args(spec(engine={"enforceEager": True, "cudaGraph": {"mode": "FULL", "captureSizes": [8]}}), "x")
    assert "--enforce-eager" in args
    assert "--compilation-config" not in args and "--cudagraph-capture-sizes" not in args


def test_gaudi_profile_defaults_block_size_and_hpu_env() -> None:
    one = spec(accelerator={"type": "gaudi", "count": 8})
    args = engine_args(one, "x")
    assert args[args.index("--block-size") + 1] == "128"
    env = {e["name"]: e.get("value") for e in engine_env(one)}
    assert env["HABANA_VISIBLE_DEVICES"] == "all"
    assert env["PT_HPU_ENABLE_LAZY_COLLECTIVES"] == "true"


def test_intel_gpus_run_tensor_parallel_with_no_environment_of_their_own() -> None:
    one = spec(accelerator={"type": "intel-gpu", "count": 4})
    args = engine_args(one, "x")
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    env = {e["name"] for e in engine_env(one)}
    assert not {n for n in env if n.startswith(("ZE_", "VLLM_OPENVINO_", "VLLM_CPU_"))}


@pytest.mark.parametrize(("accelerator", "device"), [({"type": "cpu"}, "CPU"), ({"type": "intel-gpu"}, "GPU")])
def test_openvino_settings_become_its_variables(accelerator: dict, device: str) -> None:
    openvino = {"kvCacheSpaceGiB": 100, "enableQuantizedWeights": True}
    if device == "CPU":
        openvino["kvCachePrecision"] = "u8"
    one = spec(accelerator=accelerator, engine={"backend": "openvino", "openvino": openvino,
                                                "enableChunkedPrefill": True, "maxNumBatchedTokens": 256})
    env = {e["name"]: e.get("value") for e in engine_env(one)}
    assert env["VLLM_OPENVINO_DEVICE"] == device
    assert env["VLLM_OPENVINO_KVCACHE_SPACE"] == "100"
    assert env["VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS"] == "ON"
    assert env.get("VLLM_OPENVINO_CPU_KV_CACHE_PRECISION") == ("u8" if device == "CPU" else None)
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # vLLM's own CPU backend is not running
    args = engine_args(one, "x")
    assert "--enable-chunked-prefill" in args and args[args.index("--max-num-batched-tokens") + 1] == "256"


def test_openvino_defaults_leave_its_variables_unset() -> None:
    env = {e["name"]: e.get("value") for e in engine_env(spec(accelerator={"type": "cpu"},
                                                              engine={"backend": "openvino"}))}
    assert {n for n in env if n.startswith("VLLM_OPENVINO_")} == {"VLLM_OPENVINO_DEVICE"}
    off = spec(accelerator={"type": "cpu"},
               engine={"backend": "openvino", "openvino": {"enableQuantizedWeights": False}})
    assert {e["name"]: e.get("value") for e in engine_env(off)}["VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS"] == "OFF"


def test_secrets_only_through_secret_key_refs() -> None:
    # Without a cache claim there is no download Job: the engines download, with the token.
    one = spec(model={"name": "org/m", "hfTokenSecretRef": {"name": "hf", "key": "token"}},
               apiKeySecretRef={"name": "api", "key": "key"}, cache={"enabled": False})
    env = {e["name"]: e for e in engine_env(one)}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert "HF_HUB_OFFLINE" not in env
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "api", "key": "key"}
    assert "--api-key" not in engine_args(one, "x")


@pytest.mark.parametrize(("overrides", "pulled"), [
    ({}, True),
    ({"cache": {"existingClaim": "shared"}}, True),
    ({"cache": {"enabled": False}}, False),
    ({"engine": {"env": [{"name": "HF_HUB_OFFLINE", "value": "1"}]}}, False),
    ({"model": {"name": "org/m", "tokenizer": "org/other-tokenizer", "hfTokenSecretRef": {"name": "hf", "key": "t"}}},
     False),
])
def test_engines_after_a_download_job_stay_offline_without_the_token(overrides: dict[str, Any], pulled: bool) -> None:
    model = overrides.pop("model", {"name": "org/m", "hfTokenSecretRef": {"name": "hf", "key": "t"}})
    env = {e["name"]: e.get("value") for e in engine_env(spec(model=model, **overrides))}
    assert (env.get("HF_HUB_OFFLINE") == "1") is (pulled or "engine" in overrides)
    assert ("HF_TOKEN" in env) is not pulled


def test_user_env_overrides_operator_env() -> None:
    env = engine_env(spec(engine={"env": [{"name": "HF_HOME", "value": "/elsewhere"}]}))
    assert [e for e in env if e["name"] == "HF_HOME"] == [{"name": "HF_HOME", "value": "/elsewhere"}]


def test_pvc_model_is_mounted_path() -> None:
    args = engine_args(spec(model={"name": "pvc://weights/llama/8b"}), "x")
    assert args[args.index("--model") + 1] == "/models/llama/8b"


@pytest.mark.parametrize(("args", "expected"), [
    (["--disable-log-requests"], "--enable-log-requests"),
    (["--max-seq-len-to-capture=8192"], "captureSizes"),
    (["--worker-use-ray"], "spec.engine.distributedBackend: ray"),
    (["--swap-space", "4"], "removed from vLLM"),
    (["--model", "x"], "spec.model.name"),
    (["-tp", "2"], "spec.engine.tensorParallelSize"),
    (["--no-enable-prefix-caching"], "spec.engine.enablePrefixCaching"),
    (["--api-key=abc"], "spec.apiKeySecretRef"),
    (["--enable-prefix-cachin"], "did you mean --enable-prefix-caching"),
])
def test_extra_args_refused_with_a_reason(args: list[str], expected: str) -> None:
    errors = extra_args_errors(args)
    assert errors and expected in errors[0]


def test_extra_args_values_are_not_flags() -> None:
    assert extra_args_errors(["--seed", "-1", "--tool-call-parser", "hermes", "--max-logprobs=5"]) == []


def test_engines_keep_idle_connections_longer_than_the_scraper_does() -> None:
    env = {e["name"]: e.get("value") for e in engine_env(spec(accelerator={"type": "cpu"}))}
    assert int(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) > KEEPALIVE_SECONDS
