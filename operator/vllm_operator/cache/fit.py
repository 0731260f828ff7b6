"""Does a model fit the accelerators of one replica? Decided before any Pod is created.

From the model's config.json, its safetensors sizes (the hub's metadata, readable before the download) and
the LLMDeployment's engine figures, this computes per replica what vLLM 0.32 finds when it starts:

- the weight bytes on each device: the checkpoint as loaded (dtype cast, on-the-fly fp8, or as stored for
  pre-quantized checkpoints), split evenly over tensor x pipeline parallel devices;
- the KV-cache bytes per token on each device: layers of the stage x KV heads after TP x (K + V head dims)
  x KV dtype size; MLA models (kv_lora_rank) store one latent of kv_lora_rank + qk_rope_head_dim per layer,
  replicated on every TP rank; sliding-window layers hold only the window (plus the tokens in flight) of a
  sequence;
- the memory left for the KV cache: device memory x gpuMemoryUtilization, less the weights and
  ``RESERVED_BYTES_PER_DEVICE``; on CPU it is cpuKVCacheSpaceGiB (VLLM_CPU_KVCACHE_SPACE);
- kvCacheTokens and maxConcurrentSequences at maxModelLen, as vLLM logs them
  (``KV cache size: N tokens, Maximum concurrency for L tokens per request: C x``).

The verdict errs towards ``Fits``: ``DoesNotFit`` only when the figures leave no doubt, ``Unknown`` when the
model or the hardware is outside what is modelled here. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from vllm_operator.api import GROUP, CapacityStatus, LLMDeploymentSpec, hub_offline, parse_model_source
from vllm_operator.render.engine_args import parallel_sizes
from vllm_operator.render.profiles import CPU_KV_CACHE_SPACE_GIB_DEFAULT

SKIP_FIT_CHECK_ANNOTATION = f"{GROUP}/skip-fit-check"

MIB = 1 << 20
GIB = 1 << 30
# vLLM 0.32's --gpu-memory-utilization default.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
# Kept per device for what is neither weights nor KV cache: the activation peak of vLLM's profiling forward
# pass (about 1.2 GiB for an 8B model), memory outside torch (CUDA/HIP/HPU context, NCCL buffers) and the
# graph pool. 2 GiB is the low end of what vLLM measures, on purpose: the check must never call a model that
# vLLM can serve DoesNotFit, so an estimate that errs errs towards Fits.
RESERVED_BYTES_PER_DEVICE = 2 * GIB
# vLLM on Gaudi keeps this share of the memory left after the weights for HPU graphs
# (VLLM_GRAPH_RESERVED_MEM).
GAUDI_GRAPH_RESERVED = 0.1
# One replica is one Pod, on one node: tensor parallelism beyond a node's 8 devices is no suggestion.
MAX_DEVICES_PER_REPLICA = 8
# What a 4-bit AWQ/GPTQ checkpoint stores per linear weight: 4 bits, plus a 16-bit scale and a 4-bit zero
# point per group of 128.
FOUR_BIT_BYTES_PER_PARAMETER = (4 + 20 / 128) / 8

# Architectures whose KV cache the rules here describe. Others (hybrid Mamba, chunked-local or sparse
# attention, shared KV layers, encoder-decoder) would be mismeasured in either direction: Unknown.
KNOWN_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "granite",
    "deepseek_v2", "deepseek_v3",
})

# Bytes per element of the weights as vLLM computes with them (--dtype); auto casts float32 checkpoints
# to 16 bits.
_COMPUTE_DTYPE_BYTES = {"float": 4, "float32": 4, "half": 2, "float16": 2, "bfloat16": 2}
_CONFIG_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SAFETENSORS_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# Quantizations vLLM applies while loading a 16-bit checkpoint, by bytes per linear weight; other methods
# need a checkpoint quantized with them.
_ONLINE_QUANTIZATION_BYTES = {"fp8": 1, "ptpc_fp8": 1}
_KV_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1}
# fp8_ds_mla packs an MLA latent per layer and token into 656 bytes: 512 fp8 values, 4 float32 scales and
# the 64 rope dims in bf16.
_FP8_DS_MLA_BYTES = 656
# Rope scalings whose factor is already part of max_position_embeddings (vLLM does not apply it again).
_UNSCALED_ROPE_TYPES = frozenset({"default", "su", "longrope", "llama3", "yarn", "deepseek_yarn",
                                  "deepseek_llama_scaling"})
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_target_positions",
                 "max_sequence_length", "max_seq_length", "seq_len")


@dataclass(frozen=True)
class Device:
    """One accelerator device and its memory."""

    name: str
    memory_bytes: int


# Memory as the drivers report it (nvidia-smi, which the nvidia.com/gpu.memory node label carries in MiB;
# rocm-smi; hl-smi): a little less than the marketing figure. Patterns match product label values, upper
# case with every run of other characters turned into "-" (NVIDIA-H100-80GB-HBM3, AMD-INSTINCT-MI300X).
_PRODUCTS: tuple[tuple[str, str, Device], ...] = (
    ("nvidia", r"H200", Device("NVIDIA H200", 143_771 * MIB)),
    ("nvidia", r"H100(?!.*NVL)", Device("NVIDIA H100 80GB", 81_559 * MIB)),
    ("nvidia", r"A100.*80GB", Device("NVIDIA A100 80GB", 81_920 * MIB)),
    ("nvidia", r"A100.*40GB", Device("NVIDIA A100 40GB", 40_960 * MIB)),
    ("nvidia", r"L40S", Device("NVIDIA L40S", 46_068 * MIB)),
    ("nvidia", r"(^|-)L4(-|$)", Device("NVIDIA L4", 23_034 * MIB)),
    ("amd", r"MI300X", Device("AMD Instinct MI300X", 196_288 * MIB)),
    ("gaudi", r"GAUDI-?2|HL-?225", Device("Intel Gaudi 2", 98_304 * MIB)),
    ("gaudi", r"GAUDI-?3|HL-?32[58]", Device("Intel Gaudi 3", 131_072 * MIB)),
)
NODE_MEMORY_LABEL = "nvidia.com/gpu.memory"
NODE_PRODUCT_LABELS = ("nvidia.com/gpu.product", "amd.com/gpu.product-name", "gpu.intel.com/product")


def device_for_product(product: str, accelerator_type: str | None = None) -> Device | None:
    """The table's device for a product label value such as NVIDIA-H100-80GB-HBM3, if it knows it."""
    normalized = re.sub(r"[^A-Z0-9]+", "-", product.upper())
    return next((device for kind, pattern, device in _PRODUCTS
                 if accelerator_type in (None, kind) and re.search(pattern, normalized)), None)


def device_from_node_labels(labels: Mapping[str, str]) -> Device | None:
    """A node's device: its nvidia.com/gpu.memory label (MiB) where it has one, else its product label."""
    product = next((labels[label] for label in NODE_PRODUCT_LABELS if labels.get(label)), None)
    memory = labels.get(NODE_MEMORY_LABEL, "")
    if memory.isdigit() and int(memory) > 0:
        return Device(product or "GPU", int(memory) * MIB)
    return device_for_product(product) if product else None


def candidate_devices(accelerator_type: str, product: str | None = None,
                      node_labels: Iterable[Mapping[str, str]] = ()) -> tuple[Device, ...]:
    """The devices a replica may get, smallest memory first.

    The devices of the nodes it may run on where their labels tell; else spec.accelerator.product's; else
    every device of the accelerator type in the table. Empty for CPU and for products the table lacks.
    """
    if accelerator_type == "cpu":
        return ()
    from_nodes = {device for device in map(device_from_node_labels, node_labels) if device is not None}
    if from_nodes:
        return tuple(sorted(from_nodes, key=lambda d: (d.memory_bytes, d.name)))
    if product is not None:
        found = device_for_product(product, accelerator_type)
        return () if found is None else (found,)
    return tuple(sorted((d for kind, _, d in _PRODUCTS if kind == accelerator_type), key=lambda d: d.memory_bytes))


@dataclass(frozen=True)
class Checkpoint:
    """The model as the hub describes it before the download."""

    config: Mapping[str, Any]
    # Sum of the *.safetensors file sizes.
    weight_bytes: int
    # Parameter count per safetensors dtype (BF16, F16, I32, ...), from the hub's safetensors metadata.
    parameters: Mapping[str, int] = field(default_factory=dict)
    name: str = "the model"

    @classmethod
    def from_hub(cls, name: str, config: Mapping[str, Any], file_sizes: Mapping[str, int],
                 parameters: Mapping[str, int] | None = None) -> Checkpoint:
        """From a repo's file list (name -> size); only the safetensors files count."""
        weight_bytes = sum(size for path, size in file_sizes.items() if path.endswith(".safetensors"))
        return cls(config, weight_bytes, dict(parameters or {}), name)


@dataclass(frozen=True)
class Deployment:
    """The figures of an LLMDeployment that decide the fit; ``from_spec`` reads them from a spec."""

    accelerator_type: str
    product: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    dtype: str | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    cpu_kv_cache_space_gib: int | None = None
    backend: str = "vllm"

    @classmethod
    def from_spec(cls, spec: LLMDeploymentSpec) -> Deployment:
        engine = spec.engine
        cpu = spec.accelerator.type == "cpu"
        tp, pp = parallel_sizes(spec)
        return cls(
            accelerator_type=spec.accelerator.type,
            product=spec.accelerator.product,
            # The CPU engine gets no --tensor-parallel-size on one node (engine_args).
            tensor_parallel_size=1 if cpu and spec.accelerator.nodes == 1 else tp,
            pipeline_parallel_size=pp,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            max_model_len=engine.max_model_len,
            max_num_batched_tokens=engine.max_num_batched_tokens,
            dtype=engine.dtype,
            quantization=engine.quantization,
            kv_cache_dtype=engine.kv_cache_dtype,
            cpu_kv_cache_space_gib=engine.cpu_kv_cache_space_gi_b,
            backend=engine.backend or "vllm",
        )

    @property
    def devices(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class Capacity:
    """One replica's memory figures on one device kind (per device: every device of a replica is alike)."""

    device: str
    devices: int
    max_model_len: int
    weight_bytes_per_device: int
    # What vLLM may use per device: memory x gpuMemoryUtilization less the reserve (CPU: the KV space).
    usable_bytes_per_device: int
    # The KV-cache pool per device; not positive when the weights do not fit.
    kv_cache_bytes_per_device: int
    # Per device, every layer of its stage holding the token.
    kv_cache_bytes_per_token: int
    # Per device, one sequence of max_model_len (sliding-window layers hold fewer tokens).
    sequence_bytes: int
    kv_cache_tokens: int
    max_concurrent_sequences: int

    @property
    def weights_fit(self) -> bool:
        return self.kv_cache_bytes_per_device > 0

    @property
    def fits(self) -> bool:
        return self.max_concurrent_sequences >= 1


@dataclass(frozen=True)
class Fits:
    capacity: Capacity
    message: str

    @property
    def kv_cache_tokens(self) -> int:
        return self.capacity.kv_cache_tokens

    @property
    def max_concurrent_sequences(self) -> int:
        return self.capacity.max_concurrent_sequences


@dataclass(frozen=True)
class DoesNotFit:
    """The numbers and the smallest changes that fit, in ``message``; capacity is None for a TP the model
    cannot split into."""

    capacity: Capacity | None
    message: str
    suggestions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unknown:
    message: str


Verdict = Fits | DoesNotFit | Unknown


def fit_check_skipped(annotations: Mapping[str, str]) -> bool:
    """The LLMDeployment asks not to be checked (``llm.vllm-operator.io/skip-fit-check: "true"``)."""
    return annotations.get(SKIP_FIT_CHECK_ANNOTATION, "").strip().lower() == "true"


@dataclass(frozen=True)
class _Shape:
    """What of config.json sizes the weights and the KV cache."""

    model_type: str
    layers: int
    attention_heads: int
    kv_heads: int
    # Elements one KV head stores per token and layer: K + V head dims, or the MLA latent.
    kv_head_elements: int
    mla: bool
    sliding_layers: int
    sliding_window: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    max_model_len: int


def _positive_int(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _sliding_layers(config: Mapping[str, Any], model_type: str, layers: int) -> tuple[int, int]:
    """(layers with a sliding window, the window), following how transformers and vLLM read the config."""
    window = _positive_int(config, "sliding_window")
    if window is None or config.get("use_sliding_window") is False:
        return 0, 0
    if isinstance(layer_types := config.get("layer_types"), list):
        return sum(kind == "sliding_attention" for kind in layer_types), window
    if model_type == "gemma2":
        return (layers + 1) // 2, window  # every other layer, starting with the first
    if config.get("use_sliding_window"):
        return max(layers - (_positive_int(config, "max_window_layers") or 0), 0), window
    return layers, window  # a config-wide window applies to every layer


def _rope_factor(config: Mapping[str, Any]) -> float:
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    if not isinstance(rope, Mapping):
        return 1.0
    entries = [rope] if ("rope_type" in rope or "type" in rope) else [v for v in rope.values() if isinstance(v, Mapping)]
    factor = 1.0
    for entry in entries:
        if (entry.get("rope_type") or entry.get("type")) not in _UNSCALED_ROPE_TYPES:
            factor = entry.get("factor") or factor
    return factor


def _default_max_model_len(config: Mapping[str, Any]) -> int:
    """vLLM's default --max-model-len: the smallest length key of the config (model_max_length wins), times
    the rope scaling factor where that is not already in it; 2048 without any."""
    lengths = [v for key in _MAX_LEN_KEYS if (v := _positive_int(config, key)) is not None]
    derived = _positive_int(config, "model_max_length") or (min(lengths) if lengths else 2048)
    return int(derived * _rope_factor(config))


def _shape(config: Mapping[str, Any]) -> _Shape | str:
    """The model's shape, or why it cannot be judged."""
    model_type = config.get("model_type")
    if model_type not in KNOWN_MODEL_TYPES:
        return f"the fit of architecture {model_type or '(no model_type)'} is not modelled"
    sizes = {key: _positive_int(config, key)
             for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")}
    if missing := [key for key, value in sizes.items() if value is None]:
        return f"config.json lacks {', '.join(missing)}"
    layers, heads, hidden, vocab = (int(v) for v in sizes.values())
    mla = config.get("kv_lora_rank") is not None
    if mla:
        rank, rope = _positive_int(config, "kv_lora_rank"), _positive_int(config, "qk_rope_head_dim")
        if rank is None or rope is None:
            return "config.json has kv_lora_rank (MLA) but lacks a valid kv_lora_rank or qk_rope_head_dim"
        kv_heads, elements = 1, rank + rope
    else:
        kv_heads = _positive_int(config, "num_key_value_heads") or heads
        elements = 2 * (_positive_int(config, "head_dim") or hidden // heads)
    sliding, window = _sliding_layers(config, model_type, layers)
    return _Shape(model_type, layers, heads, kv_heads, elements, mla, sliding, window, hidden, vocab,
                  bool(config.get("tie_word_embeddings", False)), _default_max_model_len(config))


def _compute_bytes(deployment: Deployment) -> int:
    return _COMPUTE_DTYPE_BYTES.get(deployment.dtype or "auto", 2)


def _checkpoint_float_bytes(checkpoint: Checkpoint) -> int | None:
    """Bytes per parameter of a 16/32-bit checkpoint: its commonest float dtype, else config.json's."""
    floats = {dtype: n for dtype, n in checkpoint.parameters.items() if dtype in _SAFETENSORS_FLOAT_BYTES}
    if floats:
        return _SAFETENSORS_FLOAT_BYTES[max(floats, key=floats.__getitem__)]
    return _CONFIG_DTYPE_BYTES.get(checkpoint.config.get("torch_dtype") or checkpoint.config.get("dtype") or "")


def _embedding_parameters(shape: _Shape) -> int:
    # Input embeddings and the LM head stay in the compute dtype under weight quantization.
    return shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2)


def _parameters(checkpoint: Checkpoint, float_bytes: int) -> int:
    return sum(checkpoint.parameters.values()) or checkpoint.weight_bytes // float_bytes


def _loaded_weight_bytes(checkpoint: Checkpoint, shape: _Shape, deployment: Deployment) -> int | str:
    """The replica's weight bytes once vLLM has loaded them, or why they cannot be told."""
    if checkpoint.config.get("quantization_config"):
        return checkpoint.weight_bytes  # pre-quantized: loaded as stored
    float_bytes = _checkpoint_float_bytes(checkpoint)
    if float_bytes is None:
        return "neither the safetensors metadata nor config.json tell the checkpoint's dtype"
    compute = _compute_bytes(deployment)
    if deployment.quantization is None:
        return checkpoint.weight_bytes * compute // float_bytes
    online = _ONLINE_QUANTIZATION_BYTES.get(deployment.quantization)
    if online is None:
        return (f"engine.quantization {deployment.quantization} needs a checkpoint quantized with it, and "
                "config.json has no quantization_config")
    embedding = _embedding_parameters(shape)
    return embedding * compute + int((_parameters(checkpoint, float_bytes) - embedding) * online)


def _four_bit_weight_bytes(checkpoint: Checkpoint, shape: _Shape, deployment: Deployment) -> int | None:
    """The weight bytes of a 4-bit AWQ/GPTQ checkpoint of the same model."""
    float_bytes = _checkpoint_float_bytes(checkpoint)
    if float_bytes is None or checkpoint.config.get("quantization_config"):
        return None
    embedding = _embedding_parameters(shape)
    linear = _parameters(checkpoint, float_bytes) - embedding
    return embedding * _compute_bytes(deployment) + int(linear * FOUR_BIT_BYTES_PER_PARAMETER)


def _layer_token_bytes(shape: _Shape, deployment: Deployment) -> int | str:
    """KV-cache bytes one layer stores per token on one device."""
    kv_dtype = deployment.kv_cache_dtype or "auto"
    if kv_dtype == "fp8_ds_mla":
        return _FP8_DS_MLA_BYTES if shape.mla else "engine.kvCacheDtype fp8_ds_mla applies to MLA models only"
    size = _compute_bytes(deployment) if kv_dtype == "auto" else _KV_DTYPE_BYTES.get(kv_dtype)
    if size is None:
        return f"the size of KV-cache dtype {kv_dtype} is not modelled"
    # MLA's latent is shared by all heads and replicated on every TP rank; GQA heads are split over the
    # ranks, at least one per rank.
    heads = 1 if shape.mla else max(1, shape.kv_heads // deployment.tensor_parallel_size)
    return heads * shape.kv_head_elements * size


def _tokens_in_flight(deployment: Deployment, device: Device | None) -> int:
    """Tokens scheduled but not yet freed, which sliding-window layers keep beyond their window: vLLM 0.32's
    default --max-num-batched-tokens for the device, times the batches in flight (2 with async scheduling,
    one per pipeline stage with pipeline parallelism)."""
    batched = deployment.max_num_batched_tokens
    if batched is None:
        batched = 2048
        if device is not None and device.memory_bytes >= 160 * GIB:
            batched = 16384
        elif device is not None and device.memory_bytes >= 70 * GIB and "A100" not in device.name:
            batched = 8192
    return batched * (2 if deployment.pipeline_parallel_size == 1 else deployment.pipeline_parallel_size)


def _stage_layers(shape: _Shape, deployment: Deployment) -> int:
    """Layers of the largest pipeline stage."""
    return math.ceil(shape.layers / deployment.pipeline_parallel_size)


def _sequence_bytes(shape: _Shape, layer_bytes: int, deployment: Deployment, in_flight: int, length: int) -> int:
    """KV-cache bytes one sequence of ``length`` tokens takes on one device (the largest pipeline stage)."""
    sliding_tokens = min(shape.sliding_window - 1 + in_flight, length) if shape.sliding_layers else 0
    layer_tokens = (shape.layers - shape.sliding_layers) * length + shape.sliding_layers * sliding_tokens
    return math.ceil(layer_tokens * layer_bytes * _stage_layers(shape, deployment) / shape.layers)


@dataclass(frozen=True)
class _Model:
    checkpoint: Checkpoint
    shape: _Shape


def _capacity(model: _Model, weight_bytes: int, deployment: Deployment, device: Device | None) -> Capacity | str:
    """The figures of ``deployment`` with ``weight_bytes`` loaded, on ``device`` (None: CPU)."""
    shape = model.shape
    layer_bytes = _layer_token_bytes(shape, deployment)
    if isinstance(layer_bytes, str):
        return layer_bytes
    length = deployment.max_model_len or shape.max_model_len
    weights = weight_bytes // deployment.devices
    if device is None:
        usable = kv = (deployment.cpu_kv_cache_space_gib or CPU_KV_CACHE_SPACE_GIB_DEFAULT) * GIB
    else:
        utilization = deployment.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        usable = int(device.memory_bytes * utilization) - RESERVED_BYTES_PER_DEVICE
        kv = usable - weights
        if deployment.accelerator_type == "gaudi" and kv > 0:
            kv = int(kv * (1 - GAUDI_GRAPH_RESERVED))
    sequence = _sequence_bytes(shape, layer_bytes, deployment, _tokens_in_flight(deployment, device), length)
    pool = max(kv, 0)
    return Capacity(
        device=device.name if device else "CPU",
        devices=deployment.devices,
        max_model_len=length,
        weight_bytes_per_device=weights,
        usable_bytes_per_device=usable,
        kv_cache_bytes_per_device=kv,
        kv_cache_bytes_per_token=layer_bytes * _stage_layers(shape, deployment),
        sequence_bytes=sequence,
        # vLLM reports its capacity as the concurrency at max_model_len times max_model_len.
        kv_cache_tokens=pool * length // sequence,
        max_concurrent_sequences=pool // sequence,
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _largest_length(model: _Model, weight_bytes: int, deployment: Deployment, device: Device | None) -> int | None:
    """The largest maxModelLen below the current one that fits, rounded down (to 1024s, or 16s below
    1024); None when not even 16 tokens do."""
    start = _capacity(model, weight_bytes, deployment, device)
    if isinstance(start, str) or not start.weights_fit:
        return None
    low, high = 0, start.max_model_len
    while low < high:  # largest length whose one sequence fits
        middle = (low + high + 1) // 2
        trial = _capacity(model, weight_bytes, replace(deployment, max_model_len=middle), device)
        low, high = (middle, high) if isinstance(trial, Capacity) and trial.fits else (low, middle - 1)
    bound = low - low % (1024 if low >= 1024 else 16)
    return bound if bound >= 16 else None


def _try(model: _Model, weight_bytes: int | str | None, deployment: Deployment, device: Device | None,
         change: str) -> tuple[str, bool] | None:
    """``change`` and True if it fits as is, or with a maxModelLen bound and False; None if neither."""
    if not isinstance(weight_bytes, int):
        return None
    capacity = _capacity(model, weight_bytes, deployment, device)
    if isinstance(capacity, str):
        return None
    if capacity.fits:
        return f"{change} ({capacity.kv_cache_tokens:,} KV-cache tokens)", True
    bound = _largest_length(model, weight_bytes, deployment, device)
    return None if bound is None else (f"{change} with engine.maxModelLen: {bound}", False)


def _first_fit(tries: Iterable[tuple[str, bool] | None]) -> list[str]:
    """The first change that fits as is, or else the first that fits with a maxModelLen bound."""
    bounded = None
    for found in tries:
        if found is not None:
            if found[1]:
                return [found[0]]
            bounded = bounded or found[0]
    return [bounded] if bounded else []


def _valid_tensor_parallel(shape: _Shape, tp: int) -> bool:
    """vLLM splits attention heads evenly, and KV heads evenly or replicated."""
    if shape.attention_heads % tp:
        return False
    return shape.mla or shape.kv_heads % tp == 0 or tp % shape.kv_heads == 0


def _suggestions(model: _Model, weight_bytes: int, deployment: Deployment, device: Device | None,
                 capacity: Capacity) -> list[str]:
    """The smallest change along each way out: more devices, a quantization, a KV dtype, the length."""
    shape, checkpoint, found = model.shape, model.checkpoint, []
    gpu = deployment.accelerator_type in ("nvidia", "amd")
    if device is None:
        found.append(f"engine.cpuKVCacheSpaceGiB: {math.ceil(capacity.sequence_bytes / GIB)}")
    else:
        pp = deployment.pipeline_parallel_size
        sizes = [tp for tp in (2, 4, 8, 16, 32, 64)
                 if deployment.tensor_parallel_size < tp and tp * pp <= MAX_DEVICES_PER_REPLICA
                 and _valid_tensor_parallel(shape, tp)]
        found += _first_fit(
            _try(model, weight_bytes, replace(deployment, tensor_parallel_size=tp), device,
                 f"accelerator.count: {tp * pp}" + (f" (engine.tensorParallelSize: {tp})" if pp > 1 else ""))
            for tp in sizes)
    if gpu and deployment.quantization is None and not checkpoint.config.get("quantization_config"):
        fp8 = replace(deployment, quantization="fp8")
        found += _first_fit((
            _try(model, _loaded_weight_bytes(checkpoint, shape, fp8), fp8, device, "engine.quantization: fp8"),
            _try(model, _four_bit_weight_bytes(checkpoint, shape, deployment), deployment, device,
                 "a 4-bit AWQ or GPTQ checkpoint of the model"),
        ))
    if capacity.weights_fit:
        if gpu and (deployment.kv_cache_dtype or "auto") in ("auto", "bfloat16", "float16"):
            kv_fp8 = _capacity(model, weight_bytes, replace(deployment, kv_cache_dtype="fp8"), device)
            if isinstance(kv_fp8, Capacity) and kv_fp8.fits:
                found.append(f"engine.kvCacheDtype: fp8 ({kv_fp8.kv_cache_tokens:,} KV-cache tokens)")
        if (bound := _largest_length(model, weight_bytes, deployment, device)) is not None:
            found.append(f"engine.maxModelLen: {bound}")
    return found


def _where(capacity: Capacity, deployment: Deployment) -> str:
    if capacity.device == "CPU":
        return f"the CPU at cpuKVCacheSpaceGiB {capacity.usable_bytes_per_device // GIB}"
    utilization = deployment.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    return f"{capacity.devices} x {capacity.device} at gpuMemoryUtilization {utilization:g}"


def _judge(model: _Model, deployment: Deployment, device: Device | None) -> Verdict:
    """The verdict on one device kind (None: CPU)."""
    shape, name = model.shape, model.checkpoint.name
    if device is not None and not _valid_tensor_parallel(shape, deployment.tensor_parallel_size):
        valid = [tp for tp in (1, 2, 4, 8, 16, 32, 64) if _valid_tensor_parallel(shape, tp)]
        return DoesNotFit(None, f"{name} cannot be split over tensorParallelSize {deployment.tensor_parallel_size}: "
                                f"vLLM needs it to divide the {shape.attention_heads} attention heads "
                                f"({', '.join(map(str, valid))} do)")
    weight_bytes = _loaded_weight_bytes(model.checkpoint, shape, deployment)
    if isinstance(weight_bytes, str):
        return Unknown(weight_bytes)
    capacity = _capacity(model, weight_bytes, deployment, device)
    if isinstance(capacity, str):
        return Unknown(capacity)
    where = _where(capacity, deployment)
    if capacity.fits:
        return Fits(capacity, (
            f"{capacity.kv_cache_tokens:,} KV-cache tokens, {capacity.max_concurrent_sequences} sequences of "
            f"maxModelLen {capacity.max_model_len:,} at once, on {where} ({_gib(capacity.weight_bytes_per_device)} "
            f"of weights and {_gib(capacity.kv_cache_bytes_per_device)} of KV cache per device)"))
    if not capacity.weights_fit:
        problem = (f"its weights need {_gib(capacity.weight_bytes_per_device)} per device and "
                   f"{_gib(capacity.usable_bytes_per_device)} is usable (after {_gib(RESERVED_BYTES_PER_DEVICE)} "
                   "kept for activations and the runtime)")
    else:
        after = "" if device is None else f"after {_gib(capacity.weight_bytes_per_device)} of weights per device "
        problem = (f"{after}the KV cache gets {_gib(capacity.kv_cache_bytes_per_device)}, "
                   f"{capacity.kv_cache_tokens:,} tokens, less than one sequence of maxModelLen "
                   f"{capacity.max_model_len:,} ({_gib(capacity.sequence_bytes)} per device)")
    suggestions = _suggestions(model, weight_bytes, deployment, device, capacity)
    advice = ("Smallest changes that fit: " + "; ".join(suggestions) + "." if suggestions
              else "No single change of devices, quantization or maxModelLen fits.")
    return DoesNotFit(capacity, f"{name} does not fit {where}: {problem}. {advice}", tuple(suggestions))


def check_fit(checkpoint: Checkpoint, deployment: Deployment,
              node_labels: Iterable[Mapping[str, str]] = ()) -> Verdict:
    """Whether one replica of ``deployment`` can serve ``checkpoint``.

    ``node_labels``: the labels of the nodes the replicas may run on, read for their device memory. When
    the device is not known exactly, the model must fit the smallest candidate to be Fits (with that
    device's figures) and miss the largest to be DoesNotFit; anything between is Unknown.
    """
    if deployment.backend != "vllm":
        return Unknown(f"the fit on the {deployment.backend} backend is not modelled")
    shape = _shape(checkpoint.config)
    if isinstance(shape, str):
        return Unknown(shape)
    if checkpoint.weight_bytes <= 0:
        return Unknown("the hub lists no safetensors weights")
    model = _Model(checkpoint, shape)
    if deployment.accelerator_type == "cpu":
        return _judge(model, deployment, None)
    devices = candidate_devices(deployment.accelerator_type, deployment.product, node_labels)
    if not devices:
        return Unknown(f"the memory of accelerator {deployment.product or deployment.accelerator_type} is not known; "
                       f"label its nodes with {NODE_MEMORY_LABEL} (MiB)")
    verdicts = [_judge(model, deployment, device) for device in devices]
    if unknown := next((v for v in verdicts if isinstance(v, Unknown)), None):
        return unknown
    if all(isinstance(v, Fits) for v in verdicts):
        return verdicts[0]
    if all(isinstance(v, DoesNotFit) for v in verdicts):
        return verdicts[-1]
    fitting = [d.name for d, v in zip(devices, verdicts) if isinstance(v, Fits)]
    missing = [d.name for d, v in zip(devices, verdicts) if isinstance(v, DoesNotFit)]
    return Unknown(f"{checkpoint.name} fits {', '.join(fitting)} but not {', '.join(missing)}; set "
                   "accelerator.product or label the nodes with their GPU memory to decide")


def fit_checked_repo(spec: LLMDeploymentSpec, annotations: Mapping[str, str]) -> str | None:
    """The Hugging Face repo whose fit to check, or None: a model from a claim or a file, an LLMDeployment that
    asks to skip the check, or engines told to stay off the hub (HF_HUB_OFFLINE), whose cache was filled otherwise."""
    if fit_check_skipped(annotations):
        return None
    kind, _, repo = parse_model_source(spec.model.name)
    return repo if kind == "hf" and not hub_offline(spec) else None


def capacity_status(verdict: Verdict | None) -> dict[str, Any] | None:
    """status.capacity for a verdict that lets the LLMDeployment go ahead."""
    if isinstance(verdict, Fits):
        capacity = verdict.capacity
        status = CapacityStatus(fit="Fits", message=verdict.message, device=capacity.device,
                                max_model_len=capacity.max_model_len, kv_cache_tokens=capacity.kv_cache_tokens,
                                max_concurrent_sequences=capacity.max_concurrent_sequences)
    elif isinstance(verdict, Unknown):
        status = CapacityStatus(fit="Unknown", message=verdict.message)
    else:
        return None
    return status.model_dump(by_alias=True, exclude_none=True)
