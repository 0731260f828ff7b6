"""The fit check: verdicts and KV-cache capacity for real models' configs, against figures computed by hand,
and for the tiny model against what real vLLM on the CPU reports at start."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from devcluster import engine
from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.cache.fit import (
    GIB,
    MIB,
    SKIP_FIT_CHECK_ANNOTATION,
    Checkpoint,
    Deployment,
    Device,
    DoesNotFit,
    Fits,
    Unknown,
    candidate_devices,
    check_fit,
    device_for_product,
    device_from_node_labels,
    fit_check_skipped,
)

HUB = Path(__file__).parent / "data" / "hub"
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_70B = "meta-llama/Llama-3.1-70B-Instruct"
LLAMA_70B_AWQ = "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"
MIXTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
QWEN = "Qwen/Qwen2.5-7B-Instruct"
DEEPSEEK = "deepseek-ai/DeepSeek-V2-Lite-Chat"
MISTRAL = "mistralai/Mistral-7B-v0.1"
GEMMA2 = "google/gemma-2-9b-it"
H100, A100_40, A100_80, L4 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-L4"
MI300X = "AMD_Instinct_MI300X"


def checkpoint(repo: str) -> Checkpoint:
    folder = HUB / repo
    sizes = json.loads((folder / "safetensors.json").read_text())
    return Checkpoint.from_hub(repo, json.loads((folder / "config.json").read_text()), sizes["files"],
                               sizes["parameters"])


# The tiny model of hack/devcluster/engine.py (generate): LlamaConfig(hidden_size=256, num_hidden_layers=2,
# num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048), in bfloat16.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16", "hidden_size": 256,
    "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "max_position_embeddings": 2048, "vocab_size": 512, "tie_word_embeddings": False,
}
TINY = Checkpoint(TINY_CONFIG, weight_bytes=4_461_248, name=engine.MODEL_ID)

# Usable memory per device, by hand: floor(MiB x 2^20 x 0.92 (vLLM's default gpuMemoryUtilization)) less the
# 2 GiB (2,147,483,648 B) kept for activations and the runtime:
#   H100 80GB   81,559 MiB -> 78,679,145,185 - 2 GiB = 76,531,661,537
#   L4          23,034 MiB -> 22,220,667,617 - 2 GiB = 20,073,183,969
#   A100 40GB   40,960 MiB -> 39,513,699,123 - 2 GiB = 37,366,215,475
#   A100 80GB   81,920 MiB -> 79,027,398,246 - 2 GiB = 76,879,914,598
#   MI300X     196,288 MiB -> 189,357,055,016 - 2 GiB = 187,209,571,368
#   Gaudi 2     98,304 MiB -> 94,832,877,895 - 2 GiB = 92,685,394,247
#   Gaudi 3    131,072 MiB -> 126,443,837,194 - 2 GiB = 124,296,353,546
# Weights: the sum of safetensors.json's files (bf16 loaded as stored):
#   Llama 3.1 8B 16,060,556,376; 70B 141,109,313,536; 70B AWQ 39,768,375,296; Mixtral 93,406,896,128;
#   Qwen2.5 7B 15,231,495,168; DeepSeek-V2-Lite 31,413,427,200; Mistral 7B 14,483,660,800; Gemma 2 9B 18,483,674,112.
# KV bytes per token and layer = KV heads per device x 2 (K, V) x head_dim x 2 (bf16):
#   Llama 8B/70B, Mixtral, Mistral: 8 KV heads x 128 -> 4,096 (TP1), 2,048 (TP2), 1,024 (TP4)
#   Qwen2.5 7B: 4 x 128 -> 2,048; Gemma 2: 8 x 256 -> 8,192; tiny: 2 x 64 -> 512
#   DeepSeek MLA: one latent of kv_lora_rank 512 + qk_rope_head_dim 64, no x2, on every TP rank -> 1,152
# kvCacheTokens = KV pool x maxModelLen // sequence bytes (= KV pool // bytes per token without sliding
# windows); maxConcurrentSequences = KV pool // sequence bytes.
CASES: list[tuple[str, str, dict[str, Any], type, int, int]] = [
    # 32 layers x 4,096 = 131,072 B/token. KV = 76,531,661,537 - 16,060,556,376 = 60,471,105,161
    # -> 461,357 tokens; 8192-token sequences: 60,471,105,161 // 1,073,741,824 = 56.
    ("llama8b-h100", LLAMA_8B, dict(accelerator_type="nvidia", product=H100, max_model_len=8192), Fits, 461_357, 56),
    # KV = 20,073,183,969 - 16,060,556,376 = 4,012,627,593 -> 30,613 tokens < 131,072 (config's default).
    ("llama8b-l4", LLAMA_8B, dict(accelerator_type="nvidia", product=L4), DoesNotFit, 30_613, 0),
    # TP2: weights 8,030,278,188 per device; KV = 12,042,905,781; 32 x 2,048 = 65,536 B/token -> 183,760
    # tokens; one sequence of 131,072 takes 8,589,934,592 -> 1.
    ("llama8b-2xl4", LLAMA_8B, dict(accelerator_type="nvidia", product=L4, tensor_parallel_size=2), Fits, 183_760, 1),
    # kvCacheDtype fp8 halves 131,072 to 65,536 B/token: 4,012,627,593 -> 61,227 tokens, 1 sequence of 32,768.
    ("llama8b-l4-kvfp8", LLAMA_8B, dict(accelerator_type="nvidia", product=L4, max_model_len=32768,
                                        kv_cache_dtype="fp8"), Fits, 61_227, 1),
    # Weights 141,109,313,536 > usable 76,531,661,537: nothing left for the KV cache.
    ("llama70b-h100", LLAMA_70B, dict(accelerator_type="nvidia", product=H100), DoesNotFit, 0, 0),
    # TP4: weights 35,277,328,384; KV = 41,254,333,153; 80 layers x 1,024 = 81,920 B/token -> 503,592 tokens;
    # a 131,072 sequence takes 10,737,418,240 -> 3.
    ("llama70b-4xh100", LLAMA_70B, dict(accelerator_type="nvidia", product=H100, tensor_parallel_size=4),
     Fits, 503_592, 3),
    # KV = 187,209,571,368 - 141,109,313,536 = 46,100,257,832; 80 x 4,096 = 327,680 B/token -> 140,686
    # tokens; a 32,768 sequence takes 10,737,418,240 -> 4.
    ("llama70b-mi300x", LLAMA_70B, dict(accelerator_type="amd", product=MI300X, max_model_len=32768),
     Fits, 140_686, 4),
    # TP2: weights 70,554,656,768; 124,296,353,546 - that = 53,741,696,778, 10% kept for HPU graphs ->
    # 48,367,527,100; 80 x 2,048 = 163,840 B/token -> 295,211 tokens; 131,072 x 163,840 -> 2 sequences.
    ("llama70b-2xgaudi3", LLAMA_70B, dict(accelerator_type="gaudi", product="Gaudi3", tensor_parallel_size=2),
     Fits, 295_211, 2),
    # AWQ, loaded as stored: KV = 76,531,661,537 - 39,768,375,296 = 36,763,286,241; fp16 KV 327,680 B/token
    # -> 112,192 tokens; a 16,384 sequence takes 5,368,709,120 -> 6.
    ("llama70b-awq-h100", LLAMA_70B_AWQ, dict(accelerator_type="nvidia", product=H100, max_model_len=16384),
     Fits, 112_192, 6),
    # TP2: weights 46,703,448,064; KV = 76,879,914,598 - that = 30,176,466,534; 65,536 B/token -> 460,456
    # tokens; a 32,768 sequence (config's default) takes 2,147,483,648 -> 14.
    ("mixtral-2xa100-80", MIXTRAL, dict(accelerator_type="nvidia", product=A100_80, tensor_parallel_size=2),
     Fits, 460_456, 14),
    # Weights 93,406,896,128 > usable 37,366,215,475.
    ("mixtral-a100-40", MIXTRAL, dict(accelerator_type="nvidia", product=A100_40), DoesNotFit, 0, 0),
    # use_sliding_window false: no window. KV = 20,073,183,969 - 15,231,495,168 = 4,841,688,801;
    # 28 x 2,048 = 57,344 B/token -> 84,432 tokens; a 32,768 sequence takes 1,879,048,192 -> 2.
    ("qwen7b-l4", QWEN, dict(accelerator_type="nvidia", product=L4), Fits, 84_432, 2),
    # MLA: KV = 37,366,215,475 - 31,413,427,200 = 5,952,788,275; 27 x 1,152 = 31,104 B/token -> 191,383
    # tokens; a 32,768 sequence takes 1,019,215,872 -> 5.
    ("deepseek-a100-40", DEEPSEEK, dict(accelerator_type="nvidia", product=A100_40, max_model_len=32768),
     Fits, 191_383, 5),
    # MLA on TP2: the latent is not split, 31,104 B/token on each device. KV = 20,073,183,969 - 15,706,713,600
    # = 4,366,470,369 -> 140,382 tokens < 163,840 (config's default; yarn's factor is already in it).
    ("deepseek-2xl4", DEEPSEEK, dict(accelerator_type="nvidia", product=L4, tensor_parallel_size=2),
     DoesNotFit, 140_382, 0),
    # Sliding window 4,096 on every layer: a sequence holds min(4,095 + 2 x 2,048 tokens in flight (L4's
    # default batch, 2 batches), 32,768) = 8,191 tokens: 131,072 x 8,191 = 1,073,610,752 B.
    # KV = 20,073,183,969 - 14,483,660,800 = 5,589,523,169 -> 5 sequences, 5,589,523,169 x 32,768 //
    # 1,073,610,752 = 170,599 tokens (42,644 without the window).
    ("mistral7b-l4", MISTRAL, dict(accelerator_type="nvidia", product=L4), Fits, 170_599, 5),
    # 42 layers x 8,192 = 344,064 B/token. KV = (92,685,394,247 - 18,483,674,112) x 0.9 = 66,781,548,121.
    # 21 sliding layers hold min(4,095 + 2 x 8,192, 8,192) = 8,192 tokens, as many as the full ones: a
    # sequence takes 344,064 x 8,192 = 2,818,572,288 -> 23; tokens 66,781,548,121 // 344,064 = 194,096.
    ("gemma2-gaudi2", GEMMA2, dict(accelerator_type="gaudi", product="Gaudi2"), Fits, 194_096, 23),
    # With maxNumBatchedTokens 512 the sliding layers hold min(4,095 + 1,024, 8,192) = 5,119 tokens:
    # 8,192 x (21 x 8,192 + 21 x 5,119) = 2,289,917,952 B -> 29 sequences, 238,905 tokens.
    ("gemma2-gaudi2-small-batches", GEMMA2, dict(accelerator_type="gaudi", product="Gaudi2",
                                                 max_num_batched_tokens=512), Fits, 238_905, 29),
    # CPU: the KV cache is cpuKVCacheSpaceGiB. 2 layers x 512 = 1,024 B/token: 1 GiB -> 1,048,576 tokens,
    # 2,048 sequences of 512. Real vLLM 0.32 with VLLM_CPU_KVCACHE_SPACE=1 and --max-model-len 512
    # (.local-cluster/localruntime/pods/*/vllm.log of the tiny model):
    #   CPU KV cache size: 1,048,576 tokens, Maximum concurrency for 512 tokens per request: 2048.00x
    ("tiny-cpu", "", dict(accelerator_type="cpu", cpu_kv_cache_space_gib=1, max_model_len=512), Fits,
     1_048_576, 2048),
    # 2 GiB -> 2,097,152 tokens, 4,096 sequences. Real vLLM 0.32, started by hand with VLLM_CPU_KVCACHE_SPACE=2
    # and --max-model-len 512 (as test_the_tiny_model_on_the_cpu_matches_real_vllm does):
    #   Explicitly set (2.0/18.96) GiB for KV cache on node 0.
    #   CPU KV cache size: 2,097,152 tokens, Maximum concurrency for 512 tokens per request: 4096.00x
    ("tiny-cpu-2gib", "", dict(accelerator_type="cpu", cpu_kv_cache_space_gib=2, max_model_len=512), Fits,
     2_097_152, 4096),
    # 4 GiB (the default) / 131,072 B/token = 32,768 tokens < 131,072.
    ("llama8b-cpu", LLAMA_8B, dict(accelerator_type="cpu"), DoesNotFit, 32_768, 0),
]


@pytest.mark.parametrize("repo, figures, verdict, tokens, sequences",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_fit_table(repo: str, figures: dict[str, Any], verdict: type, tokens: int, sequences: int) -> None:
    result = check_fit(checkpoint(repo) if repo else TINY, Deployment(**figures))
    assert isinstance(result, verdict), result
    assert isinstance(result, Fits | DoesNotFit) and result.capacity is not None
    assert (result.capacity.kv_cache_tokens, result.capacity.max_concurrent_sequences) == (tokens, sequences)


def test_llama_70b_on_one_h100_suggests_four_gpus_or_a_quantization() -> None:
    started = time.monotonic()
    result = check_fit(checkpoint(LLAMA_70B), Deployment("nvidia", H100))
    assert time.monotonic() - started < 1
    assert isinstance(result, DoesNotFit)
    # 131.4 GiB of weights against 78,679,145,185 - 2 GiB = 71.3 GiB.
    assert "131.4 GiB per device and 71.3 GiB is usable" in result.message
    # TP2 leaves 76,531,661,537 - 70,554,656,768 B = 5.6 GiB: 36,479 tokens < 131,072; TP4 fits (see the table).
    assert result.suggestions[0] == "accelerator.count: 4 (503,592 KV-cache tokens)"
    # fp8 keeps the embeddings and LM head (2 x 128,256 x 8,192 parameters) in bf16 and the other
    # 68,451,041,280 parameters in 1 byte: 72,653,733,888 B; KV 3,877,927,649 B / 327,680 = 11,834 tokens.
    assert result.suggestions[1] == "engine.quantization: fp8 with engine.maxModelLen: 11264"
    assert "accelerator.count: 4" in result.message and "quantization" in result.message


def test_a_model_too_long_for_its_kv_cache_gets_a_length_bound() -> None:
    result = check_fit(checkpoint(LLAMA_8B), Deployment("nvidia", L4))
    assert isinstance(result, DoesNotFit)
    # 30,613 tokens fit, rounded down to 1,024s; 2 L4s fit at full length (table); fp8 weights
    # (9,080,934,400 B) leave 10,992,249,569 B = 83,864 tokens.
    assert result.suggestions == (
        "accelerator.count: 2 (183,760 KV-cache tokens)",
        "engine.quantization: fp8 with engine.maxModelLen: 82944",
        "engine.maxModelLen: 29696",
    )
    assert "less than one sequence of maxModelLen 131,072" in result.message


def test_more_devices_are_powers_of_two_that_divide_the_heads() -> None:
    # Mixtral on A100 40GB: TP2 still holds 46.7 GB of weights per device; TP4 leaves 37,366,215,475 -
    # 23,351,724,032 = 14,014,491,443 B / (32 x 1,024) = 427,688 tokens.
    result = check_fit(checkpoint(MIXTRAL), Deployment("nvidia", A100_40))
    assert isinstance(result, DoesNotFit) and result.suggestions[0] == "accelerator.count: 4 (427,688 KV-cache tokens)"
    # The MLA model's latent is on every rank: only the weights shrink with TP4.
    result = check_fit(checkpoint(DEEPSEEK), Deployment("nvidia", L4, tensor_parallel_size=2))
    assert isinstance(result, DoesNotFit)
    assert result.suggestions[0].startswith("accelerator.count: 4 ")
    assert "engine.kvCacheDtype: fp8 (280,765 KV-cache tokens)" in result.suggestions


def test_a_tensor_parallel_size_that_does_not_divide_the_heads_does_not_fit() -> None:
    result = check_fit(checkpoint(QWEN), Deployment("nvidia", H100, tensor_parallel_size=8))
    assert isinstance(result, DoesNotFit) and result.capacity is None
    assert "divide the 28 attention heads (1, 2, 4 do)" in result.message


def test_cpu_suggests_the_kv_space_that_fits() -> None:
    result = check_fit(checkpoint(LLAMA_8B), Deployment("cpu"))
    assert isinstance(result, DoesNotFit)
    # One 131,072-token sequence takes 131,072 x 131,072 B = 16 GiB.
    assert result.suggestions == ("engine.cpuKVCacheSpaceGiB: 16", "engine.maxModelLen: 32768")


def test_sliding_windows_follow_the_config() -> None:
    mistral = checkpoint(MISTRAL)
    no_window = Checkpoint({**mistral.config, "sliding_window": None}, mistral.weight_bytes, mistral.parameters)
    # Without the window: 5,589,523,169 // 131,072 = 42,644 tokens, one sequence of 32,768.
    fits = check_fit(no_window, Deployment("nvidia", L4))
    assert isinstance(fits, Fits) and (fits.kv_cache_tokens, fits.max_concurrent_sequences) == (42_644, 1)
    # layer_types wins over a config-wide window: 16 sliding layers hold 8,191 tokens, 16 hold 32,768:
    # 4,096 x (16 x 32,768 + 16 x 8,191) = 2,684,289,024 B -> 2 sequences, 5,589,523,169 x 32,768 // that
    # = 68,233 tokens.
    half = Checkpoint({**mistral.config, "layer_types": ["sliding_attention", "full_attention"] * 16},
                      mistral.weight_bytes, mistral.parameters)
    fits = check_fit(half, Deployment("nvidia", L4))
    assert isinstance(fits, Fits) and (fits.kv_cache_tokens, fits.max_concurrent_sequences) == (68_233, 2)


def test_the_default_max_model_len_follows_vllm() -> None:
    llama = checkpoint(LLAMA_8B)

    def default_length(**config: Any) -> int:
        result = check_fit(Checkpoint({**llama.config, **config}, llama.weight_bytes), Deployment("cpu"))
        assert isinstance(result, Fits | DoesNotFit) and result.capacity is not None
        return result.capacity.max_model_len

    # llama3 and yarn scalings are already in max_position_embeddings (the table's 131,072 and 163,840);
    # a linear factor is not; model_max_length wins over the other keys.
    assert default_length(max_position_embeddings=8192, rope_scaling={"type": "linear", "factor": 2.0}) == 16384
    assert default_length(rope_scaling=None, model_max_length=4096) == 4096


def test_unknown_architectures_and_missing_fields_are_unknown() -> None:
    llama = checkpoint(LLAMA_8B)
    for config in ({**llama.config, "model_type": "jamba"}, {k: v for k, v in llama.config.items()
                                                             if k != "num_attention_heads"}):
        assert isinstance(check_fit(Checkpoint(config, llama.weight_bytes), Deployment("nvidia", H100)), Unknown)
    # A bf16 checkpoint cannot be served with --quantization awq; an unmodelled KV dtype; OpenVINO; no memory figure.
    for deployment in (Deployment("nvidia", H100, quantization="awq"),
                       Deployment("nvidia", H100, kv_cache_dtype="nvfp4"),
                       Deployment("cpu", backend="openvino"),
                       Deployment("intel-gpu", "Max_1550"),
                       Deployment("nvidia", "NVIDIA-H100-NVL")):
        assert isinstance(check_fit(llama, deployment), Unknown), deployment


def test_without_a_product_the_whole_family_must_agree() -> None:
    # Fits even the smallest NVIDIA GPU of the table (the L4, whose figures it reports): 30,613 tokens.
    small = check_fit(checkpoint(LLAMA_8B), Deployment("nvidia", max_model_len=8192))
    assert isinstance(small, Fits) and small.capacity.device == "NVIDIA L4" and small.kv_cache_tokens == 30_613
    # 141.1 GB of weights exceed even an H200 (143,771 MiB x 0.92 - 2 GiB = 136.6 GB).
    assert isinstance(check_fit(checkpoint(LLAMA_70B), Deployment("nvidia")), DoesNotFit)
    # Mixtral on 2 GPUs fits an A100 80GB but not an L4: it depends on the GPU.
    assert isinstance(check_fit(checkpoint(MIXTRAL), Deployment("nvidia", tensor_parallel_size=2)), Unknown)


def test_node_labels_give_the_memory() -> None:
    labels = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559"}
    assert device_from_node_labels(labels) == Device("NVIDIA-H100-80GB-HBM3", 81_559 * MIB)
    # The same memory as the table's H100: the same figures as in the table.
    fits = check_fit(checkpoint(LLAMA_8B), Deployment("nvidia", max_model_len=8192), [labels])
    assert isinstance(fits, Fits) and fits.kv_cache_tokens == 461_357
    # A product the table lacks still has its memory; a node without the label falls back on the table.
    odd = {"nvidia.com/gpu.product": "NVIDIA-RTX-PRO-6000", "nvidia.com/gpu.memory": "97887"}
    assert candidate_devices("nvidia", None, [odd, {}]) == (Device("NVIDIA-RTX-PRO-6000", 97_887 * MIB),)
    assert device_from_node_labels({"nvidia.com/gpu.product": L4}) == device_for_product(L4)


@pytest.mark.parametrize("product, memory_mib", [
    ("NVIDIA-H100-80GB-HBM3", 81_559), ("NVIDIA-H200", 143_771), ("NVIDIA-A100-SXM4-40GB", 40_960),
    ("NVIDIA-A100-80GB-PCIe", 81_920), ("NVIDIA-L4", 23_034), ("NVIDIA-L40S", 46_068),
    ("AMD_Instinct_MI300X", 196_288), ("Gaudi2", 98_304), ("HL-325L", 131_072),
])
def test_the_product_table(product: str, memory_mib: int) -> None:
    device = device_for_product(product)
    assert device is not None and device.memory_bytes == memory_mib * MIB


def test_deployment_from_spec() -> None:
    spec = LLMDeploymentSpec.model_validate({
        "model": {"name": LLAMA_70B}, "accelerator": {"type": "nvidia", "count": 8, "product": H100},
        "engine": {"pipelineParallelSize": 2, "maxModelLen": 32768, "gpuMemoryUtilization": 0.85,
                   "kvCacheDtype": "fp8", "quantization": "fp8"},
    })
    assert Deployment.from_spec(spec) == Deployment(
        accelerator_type="nvidia", product=H100, tensor_parallel_size=4, pipeline_parallel_size=2,
        gpu_memory_utilization=0.85, max_model_len=32768, quantization="fp8", kv_cache_dtype="fp8")
    cpu = LLMDeploymentSpec.model_validate({"model": {"name": LLAMA_8B}, "accelerator": {"type": "cpu"},
                                            "engine": {"cpuKVCacheSpaceGiB": 8}})
    assert Deployment.from_spec(cpu) == Deployment(accelerator_type="cpu", cpu_kv_cache_space_gib=8)


def test_the_skip_annotation() -> None:
    assert SKIP_FIT_CHECK_ANNOTATION == "llm.vllm-operator.io/skip-fit-check"
    assert fit_check_skipped({SKIP_FIT_CHECK_ANNOTATION: "true"})
    assert not fit_check_skipped({SKIP_FIT_CHECK_ANNOTATION: "false"}) and not fit_check_skipped({})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


KV_LINE = re.compile(r"CPU KV cache size: ([\d,]+) tokens")


@pytest.mark.engine
def test_the_tiny_model_on_the_cpu_matches_real_vllm(tmp_path: Path) -> None:
    """Real vLLM CPU, started by hand on the tiny model: the check's kvCacheTokens within 10% of its own."""
    snapshot = engine.model_snapshot()
    if not engine.engine_ready() or snapshot is None:
        pytest.skip("the engine venv or the tiny model is missing; run `make model`")
    space_gib, max_model_len = 2, 512
    log = tmp_path / "vllm.log"
    env = dict(os.environ, HF_HOME=str(engine.HF_HOME), HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(space_gib),
               VLLM_USE_AOT_COMPILE="0", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"))
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(engine.engine_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", engine.MODEL_ID,
             "--host", "127.0.0.1", "--port", str(_free_port()), "--max-model-len", str(max_model_len)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (found := KV_LINE.search(log.read_text())):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM logged no KV cache size within 600 s"
            time.sleep(1)
    finally:
        # The server, its engine core and worker share the new session's process group.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:  # a loaded machine can take longer to shut down than to report
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reported = int(found.group(1).replace(",", ""))
    tiny = Checkpoint(json.loads((snapshot / "config.json").read_text()), TINY.weight_bytes, name=engine.MODEL_ID)
    result = check_fit(tiny, Deployment("cpu", cpu_kv_cache_space_gib=space_gib, max_model_len=max_model_len))
    assert isinstance(result, Fits)
    assert abs(result.kv_cache_tokens - reported) <= 0.1 * reported, (result.kv_cache_tokens, reported)
    assert result.kv_cache_tokens == space_gib * GIB // 1024
