"""The LLMDeployment API (llm.vllm-operator.io/v1alpha1) as pydantic models.

These models are the single source of truth: the operator parses specs with them and
``vllm_operator.api.crd`` generates the CRD's OpenAPI schema from them. Rules that span several
fields are written twice on purpose, once as CEL (``x-kubernetes-validations``, checked by the
apiserver at admission) and once in Python (checked by the operator, which reports a condition);
``tests/test_invalid_manifests.py`` holds both to the same catalog.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from vllm_operator.engines.metrics import EngineStats
from vllm_operator.engines.startup import StartupStage
from vllm_operator.render.vllm_flags import (
    REMOVED_FLAGS,
    VALUE_TOKEN_PATTERN,
    VLLM_VERSION,
    catalog,
    extra_args_errors,
    owned_flag_pattern,
)

GROUP = "llm.vllm-operator.io"
VERSION = "v1alpha1"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
SINGULAR = "llmdeployment"
SHORT_NAMES = ["llmd"]

# Kubernetes resource.Quantity, as the apiserver's own parser accepts it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
HF_REPO_ID_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$"
PVC_MODEL_PATTERN = r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^/].*)?$"
# Unicode's whitespace, spelled out: \s is all of it to pydantic's regex engine but ASCII only to the apiserver's
# (RE2), so a pattern with \s would let the apiserver accept what the operator then refuses.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Names, references and paths take neither whitespace nor control characters (C0, DEL, C1).
UNPRINTABLE = WHITESPACE + "\x00-\x1f\x7f-\x9f"
PRINTABLE_PATTERN = f"^[^{UNPRINTABLE}]+$"
# A glob over paths inside a repo (fnmatch, as huggingface_hub filters files): relative, no spaces.
FILE_PATTERN = f"^[^/{UNPRINTABLE}][^{UNPRINTABLE}]*$"
PARENT_SEGMENT = r"(^|/)[.][.](/|$)"  # no backslash: it is also a CEL string
PATTERNS_MESSAGE = "model.allowPatterns and model.ignorePatterns are globs of paths inside the repo, without '..'"
# The files vLLM loads a safetensors checkpoint from: configs, tokenizers, chat templates, weights and their
# index, and a remote-code model's Python. Other weight formats and Meta's original/ copy are not fetched.
DEFAULT_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")
DEFAULT_IGNORE_PATTERNS = ("original/*", "*.bin", "*.pth", "*.pt", "*.gguf", "*.msgpack", "*.h5", "*.onnx")



def _check_quantity(value: str | int) -> str | int:
    if isinstance(value, str) and not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} should match a Kubernetes quantity such as 500m, 8Gi or 2")
    return value


Quantity = Annotated[
    str | int,
    AfterValidator(_check_quantity),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


# Label and annotation keys: an optional DNS-subdomain prefix (at most 253 characters) and '/', then a name of at most
# 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit. Label values: such a name, or empty.
# No backslash in the patterns: the key pattern is also a CEL string.
LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY_PATTERN = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{LABEL_NAME}$"
LABEL_VALUE_PATTERN = rf"^({LABEL_NAME})?$"
MAX_KEY_PREFIX = 253
MAX_ENTRIES = 64


def _key_message(field: str) -> str:
    return (f"{field} keys must be label keys: an optional DNS subdomain prefix (at most {MAX_KEY_PREFIX} characters) "
            "and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit")


def _check_keys(field: str) -> Any:
    def check(values: dict[str, str]) -> dict[str, str]:
        if len(values) > MAX_ENTRIES:
            raise ValueError(f"{field} has {len(values)} entries; at most {MAX_ENTRIES} are allowed")
        for key in values:
            if not re.fullmatch(LABEL_KEY_PATTERN, key) or key.find("/") > MAX_KEY_PREFIX:
                raise ValueError(f"{_key_message(field)}: {key!r}")
        return values
    return AfterValidator(check)


def _keys_rule(field: str) -> dict[str, str]:
    """The CEL twin of ``_check_keys``: JSON Schema's propertyNames is not allowed in a CRD."""
    return cel(f"self.all(k, k.matches('{LABEL_KEY_PATTERN}') && "
               f"(!k.contains('/') || k.indexOf('/') <= {MAX_KEY_PREFIX}))", _key_message(field))


def label_map(field: str, description: str) -> Any:
    """A map of Kubernetes labels (node selectors, Pod labels): keys and values as the apiserver takes them."""
    value = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
    return Annotated[dict[str, value], _check_keys(field), Field(  # type: ignore[valid-type]
        default_factory=dict, description=description,
        json_schema_extra={"maxProperties": MAX_ENTRIES, "x-kubernetes-validations": [_keys_rule(field)]})]


def annotation_map(field: str, description: str) -> Any:
    """A map of annotations: keys as label keys, values free."""
    return Annotated[dict[str, str], _check_keys(field), Field(
        default_factory=dict, description=description,
        json_schema_extra={"maxProperties": MAX_ENTRIES, "x-kubernetes-validations": [_keys_rule(field)]})]


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors.

    Strict types, as the apiserver's schema has them: "2" is no integer and 1 no boolean (pydantic's lax mode
    would take both, and so accept specs the apiserver refuses).
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
                              strict=True)


class KeyRef(ApiModel):
    """A key of a Secret or ConfigMap in the LLMDeployment's namespace."""

    name: str = Field(
        description="Name of the Secret or ConfigMap in the same namespace.",
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
    )
    key: str = Field(
        description="Key inside it whose value is used.",
        min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
    )


def _check_patterns(values: list[str]) -> list[str]:
    if any(re.search(PARENT_SEGMENT, value) for value in values):
        raise ValueError(PATTERNS_MESSAGE)
    return values


FilePatterns = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=256, pattern=FILE_PATTERN)]],
    AfterValidator(_check_patterns),
    Field(min_length=1, max_length=64, json_schema_extra={
        "x-kubernetes-list-type": "atomic",
        "x-kubernetes-validations": [cel(f"!self.exists(p, p.matches('{PARENT_SEGMENT}'))", PATTERNS_MESSAGE)],
    }),
]


class ModelSpec(ApiModel):
    """What to serve."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.name.contains('://') ? (self.name.startsWith('pvc://') || self.name.startsWith('file:///'))"
                    f" : self.name.matches('{HF_REPO_ID_PATTERN}')",
                    "model.name must be a Hugging Face repo id (org/name), pvc://<claim>/<path> or file:///<absolute path>",
                    ".name",
                ),
                cel(
                    f"!self.name.startsWith('pvc://') || self.name.matches('{PVC_MODEL_PATTERN}')",
                    "model.name pvc://<claim>/<path> needs a claim name (lowercase letters, digits and '-')",
                    ".name",
                ),
                cel(
                    "!(has(self.chatTemplate) && has(self.chatTemplateConfigMapRef))",
                    "set either model.chatTemplate or model.chatTemplateConfigMapRef, not both",
                ),
            ]
        }
    )

    name: str = Field(
        description=(
            "The model: a Hugging Face repo id such as meta-llama/Meta-Llama-3-8B-Instruct (downloaded into the "
            "cache volume), pvc://<claim>/<path> for weights on an existing PersistentVolumeClaim, or "
            "file:///<path> for weights baked into the image."
        ),
        min_length=1, max_length=512,
    )
    revision: str | None = Field(
        None, description="Branch, tag or commit of the Hugging Face repo. Default: the repo's default branch.",
        min_length=1, max_length=255, pattern=PRINTABLE_PATTERN,
    )
    tokenizer: str | None = Field(
        None, description="Another Hugging Face repo id or path to load the tokenizer from. Default: the model's.",
        min_length=1, max_length=512,
    )
    served_name: str | None = Field(
        None,
        description="Model name clients put in OpenAI API requests. Default: metadata.name.",
        min_length=1, max_length=255, pattern=PRINTABLE_PATTERN,
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model repo's own Python code to run (needed by some architectures)."
    )
    chat_template: str | None = Field(
        None, description="Inline Jinja chat template that replaces the tokenizer's.", min_length=1, max_length=65536
    )
    chat_template_config_map_ref: KeyRef | None = Field(
        None, description="A ConfigMap key holding the Jinja chat template; exclusive with chatTemplate."
    )
    hf_token_secret_ref: KeyRef | None = Field(
        None, description=(
            "Secret key holding a Hugging Face token, for gated or private repos: HF_TOKEN of the download Job "
            "only, or of the engines when they download themselves."
        ),
    )
    allow_patterns: FilePatterns | None = Field(
        None,
        description=(
            "Globs of the repo's files the download Job fetches. Default: "
            f"{', '.join(DEFAULT_ALLOW_PATTERNS)} (what vLLM loads a safetensors checkpoint from)."
        ),
    )
    ignore_patterns: FilePatterns | None = Field(
        None,
        description=(
            "Globs of the repo's files the download Job skips, even when allowed. Default: "
            f"{', '.join(DEFAULT_IGNORE_PATTERNS)} (other weight formats and Meta's original/ copy)."
        ),
    )

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        parse_model_source(self.name)
        if self.chat_template is not None and self.chat_template_config_map_ref is not None:
            raise ValueError("set either model.chatTemplate or model.chatTemplateConfigMapRef, not both")
        return self


AcceleratorType = Literal["nvidia", "amd", "gaudi", "intel-gpu", "cpu"]
MAX_NODES_PER_REPLICA = 64
PRODUCT_TYPES = ("nvidia", "amd", "intel-gpu")
PRODUCT_MESSAGE = "accelerator.product selects a GPU model and applies to types nvidia, amd and intel-gpu only"
INTEL_GPU_RESOURCE_MESSAGE = (
    "accelerator.intelGpuResource chooses the Intel device plugin's resource (gpu.intel.com/i915 or "
    "gpu.intel.com/xe) and applies to type intel-gpu only"
)


class AcceleratorSpec(ApiModel):
    """The accelerator each replica runs on."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.type != 'cpu' || !has(self.count)",
                    "accelerator.count is the number of GPUs or Gaudi cards per replica; remove it for type cpu "
                    "(size CPU replicas with spec.resources)",
                    ".count",
                ),
                cel(
                    f"!has(self.product) || self.type in [{', '.join(repr(t) for t in PRODUCT_TYPES)}]",
                    PRODUCT_MESSAGE,
                    ".product",
                ),
                cel("!has(self.intelGpuResource) || self.type == 'intel-gpu'", INTEL_GPU_RESOURCE_MESSAGE,
                    ".intelGpuResource"),
            ]
        }
    )

    type: AcceleratorType = Field(
        description=(
            "Accelerator kind: nvidia (nvidia.com/gpu), amd (amd.com/gpu), gaudi (habana.ai/gaudi), intel-gpu "
            "(gpu.intel.com/i915 or gpu.intel.com/xe) or cpu."
        )
    )
    count: int | None = Field(
        None, description="Accelerators per replica (GPU/Gaudi types only). Default: 1.", ge=1, le=64
    )
    product: str | None = Field(
        None,
        description=(
            "GPU product label value, e.g. NVIDIA-H100-80GB-HBM3; becomes a node selector on "
            "nvidia.com/gpu.product (nvidia), amd.com/gpu.product-name (amd) or gpu.intel.com/product "
            "(intel-gpu, e.g. Max_1550 or Flex_170)."
        ),
        min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
    )
    nodes_per_replica: int | None = Field(
        None,
        description=(
            "Nodes one replica spans, for a model larger than one node: each replica becomes a LeaderWorkerSet "
            "group of this many Pods (a leader that serves the API and headless workers), each on its own node "
            "with accelerator.count devices, scheduled and restarted together. Needs the LeaderWorkerSet "
            "controller (sigs.k8s.io/lws) in the cluster. Default: 1 (one Pod per replica, in a Deployment)."
        ),
        ge=1, le=MAX_NODES_PER_REPLICA,
    )
    intel_gpu_resource: Literal["i915", "xe"] | None = Field(
        None,
        description=(
            "Intel GPUs only: the resource Intel's GPU device plugin advertises on the nodes, named after the "
            "kernel driver that runs the cards: i915 (gpu.intel.com/i915) or xe (gpu.intel.com/xe). Default: i915."
        ),
    )

    @model_validator(mode="after")
    def _check_count(self) -> AcceleratorSpec:
        if self.type == "cpu" and self.count is not None:
            raise ValueError(
                "accelerator.count is the number of GPUs or Gaudi cards per replica; remove it for type cpu "
                "(size CPU replicas with spec.resources)"
            )
        if self.product is not None and self.type not in PRODUCT_TYPES:
            raise ValueError(PRODUCT_MESSAGE)
        if self.intel_gpu_resource is not None and self.type != "intel-gpu":
            raise ValueError(INTEL_GPU_RESOURCE_MESSAGE)
        return self

    @property
    def devices(self) -> int:
        """Accelerator devices each Pod of a replica needs (0 for CPU)."""
        return 0 if self.type == "cpu" else self.count or 1

    @property
    def nodes(self) -> int:
        return self.nodes_per_replica or 1


CudaGraphMode = Literal["NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"]


class CudaGraphSpec(ApiModel):
    """CUDA graph capture, passed to vLLM's --compilation-config and --cudagraph-capture-sizes."""

    mode: CudaGraphMode | None = Field(None, description="cudagraph_mode of vLLM's compilation config.")
    capture_sizes: list[Annotated[int, Field(ge=1, le=8192)]] | None = Field(
        None,
        description="Batch sizes to capture graphs for (--cudagraph-capture-sizes).",
        min_length=1, max_length=128,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    @model_validator(mode="after")
    def _check_sizes(self) -> CudaGraphSpec:
        # The twin of list-type set, which makes the apiserver refuse a repeated item.
        if self.capture_sizes is not None and len(set(self.capture_sizes)) < len(self.capture_sizes):
            raise ValueError("engine.cudaGraph.captureSizes: each size may appear once")
        return self


EnvVarName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")]
# Variables that hold credentials: a literal value would store the secret in the LLMDeployment itself.
SECRET_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VLLM_API_KEY")
SECRET_ENV_MESSAGE = (
    "engine.env: HF_TOKEN, HUGGING_FACE_HUB_TOKEN and VLLM_API_KEY hold credentials and must not have a literal "
    "value (the LLMDeployment would store the secret in plain text); use model.hfTokenSecretRef, apiKeySecretRef "
    "or valueFrom.secretKeyRef"
)


class EnvVar(ApiModel):
    """An environment variable of the engine container (same shape as a Pod's env entry)."""

    name: EnvVarName = Field(description="Variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        None,
        description="Source of the value (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef), as in a Pod.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


DType = Literal["auto", "bfloat16", "float", "float16", "float32", "half"]
KVCacheDType = Literal[
    "auto", "bfloat16", "float16", "fp8", "fp8_ds_mla", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_per_token_head",
    "int4_per_token_head", "int8_per_token_head", "nvfp4", "nvfp4_4over6", "nvfp4_ds_mla", "turboquant_3bit_nc",
    "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_k8v4", "ultraquant_4bit",
]


class OpenVINOSpec(ApiModel):
    """Settings of vLLM's OpenVINO backend (engine.backend: openvino), passed as its environment variables."""

    kv_cache_space_gi_b: int | None = Field(
        None,
        alias="kvCacheSpaceGiB",
        description="KV cache size in GiB (VLLM_OPENVINO_KVCACHE_SPACE). Default: the backend's (4 on CPUs).",
        ge=1, le=4096,
    )
    kv_cache_precision: Literal["u8"] | None = Field(
        None,
        description=(
            "KV cache precision on CPUs (VLLM_OPENVINO_CPU_KV_CACHE_PRECISION): u8 halves the cache's memory. "
            "Default: f16 or bf16, as the CPU supports."
        ),
    )
    enable_quantized_weights: bool | None = Field(
        None,
        description=(
            "Compress the weights to 8 bits while loading (VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS=ON). "
            "Default: off."
        ),
    )


# The OpenVINO backend's limits (vLLM's OpenVINO installation guide and platform code): one device, float32
# compute, its own KV cache precision and block size, no LoRA. It would cast, override or ignore these silently.
# LoRA: how many adapters an engine holds when spec.engine.maxLoras is unset, and the most it may hold.
DEFAULT_MAX_LORAS = 4
MAX_ADAPTERS = 256
IS_OPENVINO = "has(self.backend) && self.backend == 'openvino'"
OPENVINO_FIELDS_MESSAGE = "engine.openvino applies only with engine.backend: openvino"
OPENVINO_DTYPES = ("auto", "float", "float32")
OPENVINO_DTYPE_MESSAGE = "the OpenVINO backend computes in float32 only: remove engine.dtype or set it to float32"
OPENVINO_KV_DTYPE_MESSAGE = (
    "engine.kvCacheDtype is not supported by the OpenVINO backend: use engine.openvino.kvCachePrecision"
)
OPENVINO_BLOCK_SIZE_MESSAGE = (
    "engine.blockSize is not supported by the OpenVINO backend, which picks its own (32 on CPUs, 16 on GPUs)"
)
OPENVINO_LORA_MESSAGE = "the OpenVINO backend does not support LoRA adapters: remove spec.adapters, engine.maxLoras and " \
    "engine.maxLoraRank"
OPENVINO_ACCELERATOR_MESSAGE = "engine.backend openvino runs on accelerator types cpu and intel-gpu only"
OPENVINO_ONE_DEVICE_MESSAGE = (
    "the OpenVINO backend does not support tensor or pipeline parallelism: accelerator.count, "
    "accelerator.nodesPerReplica, engine.tensorParallelSize and engine.pipelineParallelSize must be 1"
)
OPENVINO_CPU_KV_MESSAGE = (
    "engine.cpuKVCacheSpaceGiB sizes the cache of vLLM's own CPU backend; with engine.backend openvino use "
    "engine.openvino.kvCacheSpaceGiB"
)
OPENVINO_GPU_PRECISION_MESSAGE = (
    "engine.openvino.kvCachePrecision u8 is not supported by the OpenVINO backend on GPUs (it uses f16 there); "
    "it applies to accelerator type cpu only"
)


class EngineSpec(ApiModel):
    """vLLM engine settings. Unset fields keep vLLM's or the accelerator profile's default."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(f"!has(self.openvino) || ({IS_OPENVINO})", OPENVINO_FIELDS_MESSAGE, ".openvino"),
                cel(f"!({IS_OPENVINO}) || !has(self.dtype) || self.dtype in "
                    f"[{', '.join(repr(d) for d in OPENVINO_DTYPES)}]", OPENVINO_DTYPE_MESSAGE, ".dtype"),
                cel(f"!({IS_OPENVINO}) || !has(self.kvCacheDtype)", OPENVINO_KV_DTYPE_MESSAGE, ".kvCacheDtype"),
                cel(f"!({IS_OPENVINO}) || !has(self.blockSize)", OPENVINO_BLOCK_SIZE_MESSAGE, ".blockSize"),
                cel(f"!({IS_OPENVINO}) || (!has(self.maxLoras) && !has(self.maxLoraRank))", OPENVINO_LORA_MESSAGE,
                    ".maxLoras"),
                cel(
                    "!has(self.maxNumBatchedTokens) || !has(self.maxNumSeqs) || self.maxNumBatchedTokens >= self.maxNumSeqs",
                    "engine.maxNumBatchedTokens must be at least engine.maxNumSeqs",
                    ".maxNumBatchedTokens",
                ),
            ]
        }
    )

    backend: Literal["vllm", "openvino"] | None = Field(
        None,
        description=(
            "vllm: the accelerator's own vLLM build. openvino: vLLM on Intel's OpenVINO runtime (accelerator types "
            "cpu and intel-gpu, one device, its own image). Default: vllm."
        ),
    )
    openvino: OpenVINOSpec | None = Field(None, description="OpenVINO backend settings (with backend: openvino).")
    distributed_backend: Literal["mp", "ray"] | None = Field(
        None,
        description=(
            "How the engine runs its workers (--distributed-executor-backend) and, with accelerator.nodesPerReplica "
            "> 1, how the nodes of a replica join: mp (vLLM's own: the leader is node rank 0, the workers run "
            "headless with --nnodes, --node-rank and --master-addr) or ray (the leader starts a Ray head, the workers "
            "join it, and the server places its workers through Ray). Default: vLLM's on one node; across nodes ray "
            "for gaudi and intel-gpu (their vLLM builds support multi-node through Ray), mp for the others."
        ),
    )
    image: str | None = Field(
        None, description="Engine container image. Default: the accelerator profile's image for the backend.",
        min_length=1, max_length=512, pattern=PRINTABLE_PATTERN,
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy of the engine container. Default: IfNotPresent."
    )
    max_model_len: int | None = Field(
        None, description="Context length in tokens (--max-model-len). Default: from the model config.", ge=16,
        le=10_485_760,
    )
    gpu_memory_utilization: float | None = Field(
        None, description="Fraction of accelerator memory vLLM may use, in (0, 1] (--gpu-memory-utilization).",
        gt=0, le=1,
    )
    max_num_seqs: int | None = Field(None, description="Most sequences in one batch (--max-num-seqs).", ge=1, le=65536)
    max_num_batched_tokens: int | None = Field(
        None, description="Most tokens in one batch (--max-num-batched-tokens).", ge=1, le=10_485_760
    )
    tensor_parallel_size: int | None = Field(
        None,
        description=(
            "Tensor parallel degree (--tensor-parallel-size). Default: accelerator.count / pipelineParallelSize. "
            "tensorParallelSize x pipelineParallelSize must equal accelerator.count."
        ),
        ge=1, le=64,
    )
    pipeline_parallel_size: int | None = Field(
        None, description="Pipeline parallel degree (--pipeline-parallel-size). Default: 1.", ge=1, le=64
    )
    dtype: DType | None = Field(None, description="Weight and activation data type (--dtype). Default: auto.")
    quantization: str | None = Field(
        None, description="Quantization method of the weights, e.g. awq, gptq, fp8 (--quantization).",
        min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$",
    )
    load_format: str | None = Field(
        None, description="Weight file format, e.g. auto, safetensors, pt, gguf (--load-format).",
        min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$",
    )
    kv_cache_dtype: KVCacheDType | None = Field(None, description="KV cache data type (--kv-cache-dtype).")
    block_size: Literal[1, 8, 16, 32, 64, 128, 256] | None = Field(
        None, description="KV cache block size in tokens (--block-size). Default: vLLM's, or 128 on Gaudi."
    )
    enable_prefix_caching: bool | None = Field(
        None, description="Automatic prefix caching (--[no-]enable-prefix-caching). Default: vLLM's (on)."
    )
    enable_chunked_prefill: bool | None = Field(
        None, description="Chunked prefill (--[no-]enable-chunked-prefill). Default: vLLM's."
    )
    enforce_eager: bool | None = Field(
        None, description="Run eagerly without CUDA graphs (--enforce-eager); wins over cudaGraph."
    )
    cuda_graph: CudaGraphSpec | None = Field(None, description="CUDA graph capture settings; ignored when enforceEager.")
    cpu_kv_cache_space_gi_b: int | None = Field(
        None,
        alias="cpuKVCacheSpaceGiB",
        description="KV cache size in GiB for accelerator type cpu (VLLM_CPU_KVCACHE_SPACE). Default: 4.",
        ge=1, le=4096,
    )
    max_loras: int | None = Field(
        None,
        description=(
            "LoRA adapters an engine holds at once (--max-loras and --max-cpu-loras); spec.adapters may list at most "
            f"this many. Setting it turns LoRA on even with no adapters listed, so that adding the first one does not "
            f"restart the engines. Default: {DEFAULT_MAX_LORAS} when spec.adapters lists any."
        ),
        ge=1, le=MAX_ADAPTERS,
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = Field(
        None,
        description="Highest rank of a LoRA adapter the engines accept (--max-lora-rank); an adapter of a higher "
        "rank fails to load and is reported in status.adapters. Default: vLLM's (16).",
    )
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list,
        description=(
            "Further vLLM server arguments, e.g. [\"--enable-auto-tool-choice\", \"--tool-call-parser=hermes\"]. "
            "Flags must exist in the engine's vLLM version; flags the operator sets from other fields are refused."
        ),
        max_length=64,
        json_schema_extra={
            "x-kubernetes-list-type": "atomic",
            "x-kubernetes-validations": [
                cel(
                    f"!self.exists(a, a.matches('{owned_flag_pattern()}'))",
                    "engine.extraArgs must not set flags the operator derives from spec fields (--model, --port, "
                    "--host, --api-key, --served-model-name, --tensor-parallel-size, ...): use the spec fields",
                ),
                *(
                    cel(f"!self.exists(a, a == '{flag}' || a.startsWith('{flag}='))",
                        f"engine.extraArgs: {flag} was removed from vLLM: {advice}")
                    for flag, advice in REMOVED_FLAGS.items()
                ),
                # The twin of extra_args_errors' unknown-flag check: a value token, or a flag the server knows.
                cel(
                    f"self.all(a, a == '' || a.matches('{VALUE_TOKEN_PATTERN}') || a.split('=')[0] in "
                    f"[{', '.join(repr(flag) for flag in sorted(catalog().aliases))}])",
                    f"engine.extraArgs holds a flag that vLLM {VLLM_VERSION}'s server does not have (see vllm serve "
                    "--help)",
                ),
            ],
        },
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        description="Extra environment variables of the engine container; they override the profile's.",
        max_length=256,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            "x-kubernetes-validations": [
                cel(f"!self.exists(e, e.name in [{', '.join(repr(n) for n in SECRET_ENV_NAMES)}] && has(e.value))",
                    SECRET_ENV_MESSAGE),
            ],
        },
    )

    @model_validator(mode="after")
    def _check_engine(self) -> EngineSpec:
        if errors := extra_args_errors(self.extra_args):
            raise ValueError("engine.extraArgs: " + "; ".join(errors))
        if self.openvino is not None and self.backend != "openvino":
            raise ValueError(OPENVINO_FIELDS_MESSAGE)
        if self.backend == "openvino":
            if self.dtype not in (None, *OPENVINO_DTYPES):
                raise ValueError(OPENVINO_DTYPE_MESSAGE)
            if self.kv_cache_dtype is not None:
                raise ValueError(OPENVINO_KV_DTYPE_MESSAGE)
            if self.block_size is not None:
                raise ValueError(OPENVINO_BLOCK_SIZE_MESSAGE)
            if self.max_loras is not None or self.max_lora_rank is not None:
                raise ValueError(OPENVINO_LORA_MESSAGE)
        if any(var.name in SECRET_ENV_NAMES and var.value is not None for var in self.env):
            raise ValueError(SECRET_ENV_MESSAGE)
        # The twin of list-type map keyed by name, which makes the apiserver refuse a repeated name.
        if len({var.name for var in self.env}) < len(self.env):
            raise ValueError("engine.env: each name may appear once")
        if (
            self.max_num_batched_tokens is not None
            and self.max_num_seqs is not None
            and self.max_num_batched_tokens < self.max_num_seqs
        ):
            raise ValueError("engine.maxNumBatchedTokens must be at least engine.maxNumSeqs")
        return self


class CacheSpec(ApiModel):
    """The Hugging Face model cache volume (HF_HOME), shared by the replicas."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.existingClaim) || (!has(self.size) && !has(self.storageClassName))",
                    "cache.existingClaim uses a claim you manage; size and storageClassName apply only to the claim "
                    "the operator creates",
                ),
            ]
        }
    )

    enabled: bool = Field(True, description="Keep downloaded weights on a PersistentVolumeClaim. Default: true.")
    size: Quantity | None = Field(None, description="Size of the claim the operator creates. Default: 50Gi.")
    storage_class_name: str | None = Field(
        None, description="StorageClass of the claim. Default: the cluster's default class.",
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
    )
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] | None = Field(
        None,
        description=(
            "Access mode of the claim. Default: ReadWriteOnce, which one node mounts at a time; replicas > 1 "
            "need ReadWriteMany."
        ),
    )
    existing_claim: str | None = Field(
        None, description="Use this existing claim instead of creating one.",
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
    )
    retain_on_delete: bool = Field(
        True, description="Keep the created claim (and the downloaded weights) when the LLMDeployment is deleted."
    )

    @model_validator(mode="after")
    def _check_claim(self) -> CacheSpec:
        if self.existing_claim is not None and (self.size is not None or self.storage_class_name is not None):
            raise ValueError(
                "cache.existingClaim uses a claim you manage; size and storageClassName apply only to the claim "
                "the operator creates"
            )
        return self


class ServiceSpec(ApiModel):
    """The Service in front of the replicas."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(8000, description="Service port of the OpenAI-compatible API.", ge=1, le=65535)
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of the Service.")


class RoutingSpec(ApiModel):
    """How the gateway (vllm-operator gateway) spreads requests over the replicas."""

    strategy: Literal["LeastLoad", "PrefixHash"] = Field(
        "LeastLoad",
        description=(
            "LeastLoad: the replica with the fewest requests in flight from the gateway, plus the waiting "
            "requests and KV-cache use the engines report. PrefixHash: requests whose prompts start alike go to "
            "the same replica, where the prefix cache already holds that start (consistent hashing with bounded "
            "loads: a replica above 1.25 times the mean load passes requests on). Default: LeastLoad."
        ),
    )


class ResourceRequirements(ApiModel):
    """CPU, memory and ephemeral storage of the engine container; accelerators come from spec.accelerator."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="Requested resources, e.g. cpu: '8'.")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Resource limits, e.g. memory: 64Gi.")


class Toleration(ApiModel):
    """A Pod toleration; added to the accelerator profile's tolerations."""

    key: str | None = Field(None, description="Taint key; empty with operator Exists matches all taints.", max_length=317)
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal. Default: Equal.")
    value: str | None = Field(None, description="Taint value for operator Equal.", max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, description="For NoExecute: how long the Pod stays bound after the taint appears.", ge=0
    )


class LocalObjectReference(ApiModel):
    """A reference to an object in the same namespace."""

    name: str = Field(description="Object name.", min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)


AutoscalingMetric = Literal["requestsPerReplica", "waitingRequests", "kvCacheUsagePercent", "generationTokensPerSecond"]
KV_TARGET_MESSAGE = "autoscaling target kvCacheUsagePercent is a percentage of one replica's KV cache: at most 100"
UNIQUE_TARGETS_MESSAGE = "autoscaling.targets: each metric may appear once"
MIN_MAX_MESSAGE = "autoscaling.minReplicas must be at most autoscaling.maxReplicas"
ZERO_NEEDS_DELAY_MESSAGE = (
    "autoscaling.minReplicas 0 needs behavior.scaleToZeroAfterSeconds: how long no request may run or wait "
    "before the last replica is removed"
)
DELAY_NEEDS_ZERO_MESSAGE = "autoscaling.behavior.scaleToZeroAfterSeconds applies only with minReplicas: 0"
# A step is a number of replicas or a percentage of the replicas that exist, as in a Deployment's maxSurge.
REPLICA_STEP_PATTERN = r"^[1-9][0-9]{0,3}%$"
MAX_REPLICAS = 1000


def _check_step(value: int | str) -> int | str:
    if isinstance(value, str) and not re.fullmatch(REPLICA_STEP_PATTERN, value):
        raise ValueError(f"{value!r} should be a number of replicas or a percentage such as 100%")
    if isinstance(value, int) and not 1 <= value <= MAX_REPLICAS:
        raise ValueError(f"{value} should be between 1 and {MAX_REPLICAS} replicas")
    return value


ReplicaStep = Annotated[
    int | str,
    AfterValidator(_check_step),
    Field(json_schema_extra={
        "x-kubernetes-int-or-string": True, "pattern": REPLICA_STEP_PATTERN, "minimum": 1, "maximum": MAX_REPLICAS,
    }),
]


class AutoscalingTarget(ApiModel):
    """A load each replica should carry; the autoscaler runs as many replicas as the busiest target needs."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.metric != 'kvCacheUsagePercent' || self.value <= 100.0", KV_TARGET_MESSAGE, ".value"),
            ]
        }
    )

    metric: AutoscalingMetric = Field(
        description=(
            "What the engines report: requestsPerReplica (requests running plus waiting), waitingRequests (queued "
            "requests), kvCacheUsagePercent (KV-cache use of the fullest replica, percent) or "
            "generationTokensPerSecond (tokens generated per second)."
        )
    )
    value: float = Field(
        description=(
            "Target per replica: the autoscaler wants total load / value replicas, e.g. 40 requests at "
            "requestsPerReplica 16 ask for 3 replicas."
        ),
        gt=0,
    )

    @model_validator(mode="after")
    def _check_value(self) -> AutoscalingTarget:
        if self.metric == "kvCacheUsagePercent" and self.value > 100:
            raise ValueError(KV_TARGET_MESSAGE)
        return self


# 16 concurrent requests is far below the batch vLLM schedules on any accelerator, so a replica at target
# still has free batch slots: replicas are added while requests still run at once, before a queue forms.
DEFAULT_TARGETS = (AutoscalingTarget(metric="requestsPerReplica", value=16),)


class AutoscalingBehavior(ApiModel):
    """How fast, and after how long, the replica count follows the load."""

    scale_up_stabilization_seconds: int = Field(
        0,
        description=(
            "Scale up only to the lowest count asked for during this many seconds, so a short burst adds no "
            "replicas. Default: 0 (scale up at once)."
        ),
        ge=0, le=3600,
    )
    scale_down_stabilization_seconds: int = Field(
        300,
        description=(
            "Scale down only to the highest count asked for during this many seconds, so load that comes and goes "
            "keeps its replicas. Default: 300."
        ),
        ge=0, le=3600,
    )
    scale_down_delay_seconds: int = Field(
        300,
        description="No scale-down sooner than this many seconds after the last scale-up. Default: 300.",
        ge=0, le=86400,
    )
    scale_to_zero_after_seconds: int | None = Field(
        None,
        description=(
            "With minReplicas 0 (and only then; required then): remove the last replica after this many seconds "
            "without a request running or waiting. A request that arrives at zero needs a gateway that wakes the "
            "LLMDeployment, or kubectl scale."
        ),
        ge=1, le=604800,
    )
    max_scale_up_step: ReplicaStep = Field(
        "100%",
        description=(
            "Most replicas one decision adds: a number, or a percentage of the replicas that exist (rounded up, at "
            "least 1). Default: 100% (double)."
        ),
    )
    max_scale_down_step: ReplicaStep = Field(
        1,
        description=(
            "Most replicas one decision removes: a number, or a percentage of the replicas that exist (rounded up, "
            "at least 1). Default: 1."
        ),
    )


class AutoscalingSpec(ApiModel):
    """Replicas follow the load the engines report on /metrics; the operator writes spec.replicas."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.minReplicas) || self.minReplicas <= self.maxReplicas", MIN_MAX_MESSAGE, ".minReplicas"),
                cel(
                    "!has(self.minReplicas) || self.minReplicas != 0 || "
                    "(has(self.behavior) && has(self.behavior.scaleToZeroAfterSeconds))",
                    ZERO_NEEDS_DELAY_MESSAGE,
                    ".minReplicas",
                ),
                cel(
                    "!has(self.behavior) || !has(self.behavior.scaleToZeroAfterSeconds) || "
                    "(has(self.minReplicas) && self.minReplicas == 0)",
                    DELAY_NEEDS_ZERO_MESSAGE,
                    ".behavior.scaleToZeroAfterSeconds",
                ),
            ]
        }
    )

    min_replicas: int = Field(
        1,
        description=(
            "Fewest replicas; 0 lets an idle LLMDeployment scale to zero (needs behavior.scaleToZeroAfterSeconds). "
            "Default: 1."
        ),
        ge=0, le=MAX_REPLICAS,
    )
    max_replicas: int = Field(
        description="Most replicas. Values above 1 need a cache every replica can mount (see cache.accessMode).",
        ge=1, le=MAX_REPLICAS,
    )
    targets: list[AutoscalingTarget] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description=(
            "Load per replica to aim for, one entry per metric; the replica count is the largest any target asks "
            "for. Default: [{metric: requestsPerReplica, value: 16}]."
        ),
        min_length=1, max_length=4,
        json_schema_extra={
            "x-kubernetes-list-type": "atomic",
            "x-kubernetes-validations": [
                cel("self.all(t, self.exists_one(u, u.metric == t.metric))", UNIQUE_TARGETS_MESSAGE),
            ],
        },
    )
    behavior: AutoscalingBehavior = Field(
        default_factory=AutoscalingBehavior,
        description="Stabilization windows, delays and step sizes; the defaults suit most models.",
    )

    @model_validator(mode="after")
    def _check_autoscaling(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(MIN_MAX_MESSAGE)
        if len({target.metric for target in self.targets}) < len(self.targets):
            raise ValueError(UNIQUE_TARGETS_MESSAGE)
        zero_delay = self.behavior.scale_to_zero_after_seconds
        if self.min_replicas == 0 and zero_delay is None:
            raise ValueError(ZERO_NEEDS_DELAY_MESSAGE)
        if self.min_replicas != 0 and zero_delay is not None:
            raise ValueError(DELAY_NEEDS_ZERO_MESSAGE)
        return self


ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.:/]*[A-Za-z0-9])?$"
# The form, in CEL with a message of its own; the OpenAPI pattern adds what CEL cannot spell (no whitespace or
# control characters).
HF_ADAPTER = "hf://" + HF_REPO_ID_PATTERN[1:-1]
ADAPTER_SOURCE_FORM = f"^({HF_ADAPTER}$|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.|file:///)"
ADAPTER_SOURCE_PATTERN = (
    rf"^({HF_ADAPTER}|(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^{UNPRINTABLE}]|file:///)[^{UNPRINTABLE}]*)$"
)
ADAPTER_SOURCE_MESSAGE = (
    "adapters[].source must be hf://<org>/<repo> (a Hugging Face repo), pvc://<claim>/<folder of the adapter on "
    "that claim> or file:///<absolute folder in the engine image>, without '..'"
)
ADAPTER_REVISION_MESSAGE = "adapters[].revision applies to adapters from the hub (hf://) only"
HUB_ADAPTER_CACHE_MESSAGE = (
    "adapters from the hub (hf://) are downloaded into the cache claim before they are loaded: they need the cache "
    "(remove cache.enabled: false)"
)
ADAPTER_LIMIT_MESSAGE = (
    f"spec.adapters lists more adapters than engine.maxLoras (default {DEFAULT_MAX_LORAS}) lets an engine hold: "
    "raise engine.maxLoras (the engines restart once) or list fewer"
)
ADAPTER_CLASH_MESSAGE = (
    "an adapter may not take the model's served name (model.servedName, else metadata.name): clients could not tell "
    "them apart"
)
# A replica across nodes: the LeaderWorkerSet is named metadata.name + "-lws" (the LWS controller names its headless
# Service after it, which must not be the LLMDeployment's Service), its workers' StatefulSets "<lws>-<group>" and
# their Pods "<lws>-<group>-<rank>". A StatefulSet's name and a 10-character hash make its Pods' revision label,
# at most 63 characters: "-lws" and "-999" leave 44 for the name. On the whole object (crd.py), with its twin
# name_too_long_across_nodes.
MAX_NAME_LENGTH_ACROSS_NODES = 44
NODES_NAME_MESSAGE = (
    f"with accelerator.nodesPerReplica > 1, metadata.name may have at most {MAX_NAME_LENGTH_ACROSS_NODES} characters: "
    "the LeaderWorkerSet, its StatefulSets and Pods are named after it, and Kubernetes limits the labels they carry "
    "to 63"
)
NODES_NAME_RULE = (
    "!has(self.spec.accelerator.nodesPerReplica) || self.spec.accelerator.nodesPerReplica == 1 || "
    f"size(self.metadata.name) <= {MAX_NAME_LENGTH_ACROSS_NODES}"
)
# On the whole object, where metadata.name is in reach (crd.py); adapter_name_clash is its twin.
ADAPTER_CLASH_RULE = (
    "!has(self.spec.adapters) || !self.spec.adapters.exists(a, a.name == (has(self.spec.model.servedName) ? "
    "self.spec.model.servedName : self.metadata.name))"
)


class AdapterSpec(ApiModel):
    """A LoRA adapter of the served model, loaded into every engine at run time."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel(f"self.source.matches('{ADAPTER_SOURCE_FORM}') && !self.source.matches('{PARENT_SEGMENT}')",
            ADAPTER_SOURCE_MESSAGE, ".source"),
        cel("!has(self.revision) || self.source.startsWith('hf://')", ADAPTER_REVISION_MESSAGE, ".revision"),
    ]})

    name: str = Field(
        description="The name clients put in the model field of OpenAI API requests to use this adapter.",
        min_length=1, max_length=128, pattern=ADAPTER_NAME_PATTERN,
    )
    source: str = Field(
        description=(
            "Where the adapter (adapter_config.json and the weights, as PEFT saves them) is: hf://<org>/<repo> on "
            "the Hugging Face hub, downloaded into the cache claim by a Job first (with model.hfTokenSecretRef, if "
            "set); pvc://<claim>/<path> on a PersistentVolumeClaim of the namespace, mounted read-only into the "
            "engines (a claim no other adapter uses yet restarts them once); or file:///<path> inside the engine "
            "image."
        ),
        min_length=1, max_length=1024, pattern=ADAPTER_SOURCE_PATTERN,
    )
    revision: str | None = Field(
        None, description="Branch, tag or commit of an adapter from the hub. Default: the repo's default branch.",
        min_length=1, max_length=255, pattern=PRINTABLE_PATTERN,
    )

    @model_validator(mode="after")
    def _check_source(self) -> AdapterSpec:
        if adapter_source(self.source)[0] != "hf" and self.revision is not None:
            raise ValueError(ADAPTER_REVISION_MESSAGE)
        return self


SPEC_IS_OPENVINO = "has(self.engine.backend) && self.engine.backend == 'openvino'"
CEL_NODES = "(has(self.accelerator.nodesPerReplica) ? self.accelerator.nodesPerReplica : 1)"
CEL_DEVICES = f"(has(self.accelerator.count) ? self.accelerator.count : 1) * {CEL_NODES}"
PARALLEL_MESSAGE = (
    "engine.tensorParallelSize x engine.pipelineParallelSize must equal accelerator.count x "
    "accelerator.nodesPerReplica (the accelerators of one replica); across nodes the usual split is tensor "
    "parallel inside a node and pipeline parallel across nodes: tensorParallelSize = accelerator.count, "
    "pipelineParallelSize = accelerator.nodesPerReplica"
)
PIPELINE_MESSAGE = "accelerator.count x accelerator.nodesPerReplica must be a multiple of engine.pipelineParallelSize"
CPU_NODES_MESSAGE = (
    "on CPUs across nodes, engine.tensorParallelSize x engine.pipelineParallelSize must be a multiple of "
    "accelerator.nodesPerReplica (every node runs as many ranks); leave both out for one pipeline stage per node"
)
SHARED_CACHE_MESSAGE = (
    "replicas > 1 and replicas that span nodes (accelerator.nodesPerReplica > 1) need a cache every Pod can mount "
    "(spec.replicas and autoscaling.maxReplicas alike): a "
    "ReadWriteOnce claim attaches to one node only, so Pods on other nodes would wait forever; set "
    "cache.accessMode: ReadWriteMany (the storage class must support it), bring a shared claim with "
    "cache.existingClaim, or set cache.enabled: false"
)


class LLMDeploymentSpec(ApiModel):
    """Desired state of an LLMDeployment."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"self.accelerator.type == 'cpu' || !has(self.engine) || !has(self.engine.tensorParallelSize) || "
                    f"self.engine.tensorParallelSize * (has(self.engine.pipelineParallelSize) ? "
                    f"self.engine.pipelineParallelSize : 1) == {CEL_DEVICES}",
                    PARALLEL_MESSAGE,
                    ".engine.tensorParallelSize",
                ),
                cel(
                    f"self.accelerator.type == 'cpu' || !has(self.engine) || has(self.engine.tensorParallelSize) || "
                    f"!has(self.engine.pipelineParallelSize) || {CEL_DEVICES} % self.engine.pipelineParallelSize == 0",
                    PIPELINE_MESSAGE,
                    ".engine.pipelineParallelSize",
                ),
                cel(
                    f"self.accelerator.type != 'cpu' || {CEL_NODES} == 1 || !has(self.engine) || "
                    "((has(self.engine.tensorParallelSize) ? self.engine.tensorParallelSize : 1) * "
                    f"(has(self.engine.pipelineParallelSize) ? self.engine.pipelineParallelSize : 1)) % {CEL_NODES} == 0 "
                    "|| (!has(self.engine.tensorParallelSize) && !has(self.engine.pipelineParallelSize))",
                    CPU_NODES_MESSAGE,
                    ".engine.pipelineParallelSize",
                ),
                cel(
                    "self.accelerator.type in ['nvidia', 'amd'] || !has(self.engine) || !has(self.engine.cudaGraph)",
                    "engine.cudaGraph applies to GPU accelerators (nvidia, amd)",
                    ".engine.cudaGraph",
                ),
                cel(
                    "self.accelerator.type == 'cpu' || !has(self.engine) || !has(self.engine.cpuKVCacheSpaceGiB)",
                    "engine.cpuKVCacheSpaceGiB applies to accelerator type cpu only",
                    ".engine.cpuKVCacheSpaceGiB",
                ),
                cel(
                    f"!has(self.engine) || !({SPEC_IS_OPENVINO}) || self.accelerator.type in ['cpu', 'intel-gpu']",
                    OPENVINO_ACCELERATOR_MESSAGE,
                    ".engine.backend",
                ),
                cel(
                    f"!has(self.engine) || !({SPEC_IS_OPENVINO}) || ((!has(self.accelerator.count) || "
                    "self.accelerator.count == 1) && (!has(self.accelerator.nodesPerReplica) || "
                    "self.accelerator.nodesPerReplica == 1) && (!has(self.engine.tensorParallelSize) || "
                    "self.engine.tensorParallelSize == 1) && (!has(self.engine.pipelineParallelSize) || "
                    "self.engine.pipelineParallelSize == 1))",
                    OPENVINO_ONE_DEVICE_MESSAGE,
                    ".engine.backend",
                ),
                cel(
                    f"!has(self.engine) || !({SPEC_IS_OPENVINO}) || !has(self.engine.cpuKVCacheSpaceGiB)",
                    OPENVINO_CPU_KV_MESSAGE,
                    ".engine.cpuKVCacheSpaceGiB",
                ),
                cel(
                    "self.accelerator.type != 'intel-gpu' || !has(self.engine) || !has(self.engine.openvino) || "
                    "!has(self.engine.openvino.kvCachePrecision)",
                    OPENVINO_GPU_PRECISION_MESSAGE,
                    ".engine.openvino.kvCachePrecision",
                ),
                cel(
                    f"!has(self.adapters) || size(self.adapters) <= (has(self.engine) && has(self.engine.maxLoras) ? "
                    f"self.engine.maxLoras : {DEFAULT_MAX_LORAS})",
                    ADAPTER_LIMIT_MESSAGE,
                    ".adapters",
                ),
                cel(
                    f"!has(self.adapters) || size(self.adapters) == 0 || !has(self.engine) || !({SPEC_IS_OPENVINO})",
                    OPENVINO_LORA_MESSAGE,
                    ".adapters",
                ),
                cel(
                    "!has(self.adapters) || !self.adapters.exists(a, a.source.startsWith('hf://')) || "
                    "!has(self.cache) || !has(self.cache.enabled) || self.cache.enabled",
                    HUB_ADAPTER_CACHE_MESSAGE,
                    ".adapters",
                ),
                cel(
                    "((!has(self.replicas) || self.replicas <= 1) && (!has(self.autoscaling) || "
                    f"self.autoscaling.maxReplicas <= 1) && {CEL_NODES} == 1) || (has(self.cache) && "
                    "((has(self.cache.enabled) && "
                    "!self.cache.enabled) || has(self.cache.existingClaim) || (has(self.cache.accessMode) && "
                    "self.cache.accessMode == 'ReadWriteMany')))",
                    SHARED_CACHE_MESSAGE,
                    ".cache",
                ),
            ]
        }
    )

    model: ModelSpec = Field(description="The model to serve and how to load it.")
    accelerator: AcceleratorSpec = Field(description="Accelerator kind and count per replica.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="vLLM engine settings.")
    replicas: int = Field(
        1,
        description=(
            "Number of engine replicas. Default: 1. With autoscaling the operator writes it (through the scale "
            "subresource), and a change by hand is overruled."
        ),
        ge=0, le=MAX_REPLICAS,
    )
    autoscaling: AutoscalingSpec | None = Field(
        None,
        description=(
            "Scale replicas between minReplicas and maxReplicas on the load the engines report (requests, queue, "
            "KV cache, tokens per second), with no Prometheus needed. Leave it out to set spec.replicas yourself "
            "or with an HPA or KEDA."
        ),
    )
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Model cache volume.")
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="Service exposing the API.")
    routing: RoutingSpec = Field(
        default_factory=RoutingSpec, description="How the gateway picks a replica for each request."
    )
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        description=(
            "LoRA adapters served beside the model, each under its own name. The operator loads and unloads them "
            "in every running engine to match this list, with no restart, and a new engine Pod is Ready only once "
            "it has them (readiness gate). status.adapters says where each is loaded, or why not."
        ),
        max_length=MAX_ADAPTERS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    api_key_secret_ref: KeyRef | None = Field(
        None, description="Secret key holding the API key clients must send as a bearer token (VLLM_API_KEY)."
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="CPU and memory of the engine container."
    )
    shm_size: Quantity = Field("8Gi", description="Size of the in-memory /dev/shm volume. Default: 8Gi.")
    node_selector: label_map(  # type: ignore[valid-type]
        "nodeSelector", "Extra node selector labels, merged with the accelerator profile's.")
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Extra tolerations, added to the accelerator profile's.",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="Pod affinity rules, as in a Pod spec.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    pod_labels: label_map("podLabels", "Extra labels of the engine Pods.")  # type: ignore[valid-type]
    pod_annotations: annotation_map(  # type: ignore[valid-type]
        "podAnnotations", "Extra annotations of the engine Pods.")
    priority_class_name: str | None = Field(
        None, description="PriorityClass of the engine Pods.", min_length=1, max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
    )
    service_account_name: str | None = Field(
        None, description="ServiceAccount of the engine Pods. Default: the namespace's default.",
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN,
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Secrets for pulling the engine image from a private registry."
    )

    @model_validator(mode="after")
    def _check_spec(self) -> LLMDeploymentSpec:
        nodes = self.accelerator.nodes
        devices = self.accelerator.devices * nodes
        tp, pp = self.engine.tensor_parallel_size, self.engine.pipeline_parallel_size or 1
        if self.accelerator.type != "cpu":
            if tp is not None and tp * pp != devices:
                raise ValueError(f"{PARALLEL_MESSAGE}: {tp} x {pp} != {devices}")
            if tp is None and devices % pp:
                raise ValueError(PIPELINE_MESSAGE)
        elif nodes > 1 and (tp is not None or self.engine.pipeline_parallel_size is not None) \
                and ((tp or 1) * pp) % nodes:
            raise ValueError(CPU_NODES_MESSAGE)
        if self.accelerator.type not in ("nvidia", "amd") and self.engine.cuda_graph is not None:
            raise ValueError("engine.cudaGraph applies to GPU accelerators (nvidia, amd)")
        if self.accelerator.type != "cpu" and self.engine.cpu_kv_cache_space_gi_b is not None:
            raise ValueError("engine.cpuKVCacheSpaceGiB applies to accelerator type cpu only")
        if self.engine.backend == "openvino":
            if self.accelerator.type not in ("cpu", "intel-gpu"):
                raise ValueError(OPENVINO_ACCELERATOR_MESSAGE)
            if max(self.accelerator.count or 1, self.accelerator.nodes, self.engine.tensor_parallel_size or 1, pp) > 1:
                raise ValueError(OPENVINO_ONE_DEVICE_MESSAGE)
            if self.engine.cpu_kv_cache_space_gi_b is not None:
                raise ValueError(OPENVINO_CPU_KV_MESSAGE)
        openvino = self.engine.openvino
        if self.accelerator.type == "intel-gpu" and openvino is not None and openvino.kv_cache_precision is not None:
            raise ValueError(OPENVINO_GPU_PRECISION_MESSAGE)
        # The twin of list-type map keyed by name.
        if len({adapter.name for adapter in self.adapters}) < len(self.adapters):
            raise ValueError("spec.adapters: each name may appear once")
        if len(self.adapters) > (self.engine.max_loras or DEFAULT_MAX_LORAS):
            raise ValueError(ADAPTER_LIMIT_MESSAGE)
        if self.adapters and self.engine.backend == "openvino":
            raise ValueError(OPENVINO_LORA_MESSAGE)
        if clash := adapter_name_clash(self, None):
            raise ValueError(clash)
        if not self.cache.enabled and any(adapter_source(a.source)[0] == "hf" for a in self.adapters):
            raise ValueError(HUB_ADAPTER_CACHE_MESSAGE)
        cache = self.cache
        most = max(self.replicas, self.autoscaling.max_replicas if self.autoscaling else 0)
        if (most > 1 or nodes > 1) and cache.enabled and cache.existing_claim is None and cache.access_mode != "ReadWriteMany":
            raise ValueError(SHARED_CACHE_MESSAGE)
        return self


Phase = Literal["Pending", "Downloading", "Loading", "Ready", "Idle", "Degraded", "Failed"]


class Condition(ApiModel):
    """A Kubernetes-style condition."""

    type: str = Field(description="Condition type: Ready, Progressing, Degraded or Unschedulable.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word that says why.")
    message: str = Field(description="What happened, for a person.")
    observed_generation: int | None = Field(None, description="The metadata.generation this condition is about.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")


class AutoscalingStatus(ApiModel):
    """What the built-in autoscaler wants, and its last change of spec.replicas."""

    desired_replicas: int = Field(ge=0, description="Replicas the autoscaler asks for now.")
    reason: str = Field(description="Why it asks for them, with the metric values it used.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Each target's metric over the decision window, per target metric."
    )
    last_scale_time: str | None = Field(None, description="When it last changed spec.replicas (RFC 3339).")


class CapacityStatus(ApiModel):
    """What one replica holds, from the model's config.json and file sizes on the hub and the accelerator's memory,
    worked out before any Pod is created."""

    fit: Literal["Fits", "Unknown"] = Field(
        description="Fits, or Unknown when the check cannot judge (an architecture it does not know, no answer from "
                    "the hub, an accelerator of unknown memory). A model that does not fit fails the LLMDeployment "
                    "with reason DoesNotFit instead."
    )
    message: str = Field(description="The figures behind the verdict, or why there is none.")
    device: str | None = Field(None, description="The accelerator the figures are for, e.g. NVIDIA H100 80GB.")
    max_model_len: int | None = Field(None, description="The context length the figures are for.")
    kv_cache_tokens: int | None = Field(None, description="Tokens the KV cache of one replica holds.")
    max_concurrent_sequences: float | None = Field(
        None, description="Sequences of maxModelLen tokens one replica holds at once."
    )


CachePhase = Literal["Pending", "Downloading", "Ready", "Failed"]


class CacheStatus(ApiModel):
    """The download of a Hugging Face model into the cache claim, by the model puller Job."""

    phase: CachePhase = Field(
        description="Pending (the Job waits to start), Downloading, Ready (the engines may start) or Failed."
    )
    bytes_total: int | None = Field(None, ge=0, description="Bytes of the files to download, from the hub's listing.")
    bytes_done: int | None = Field(None, ge=0, description="Bytes of those files in the cache.")
    percent: float | None = Field(None, ge=0, le=100, description="bytesDone of bytesTotal, in percent.")
    bytes_per_second: float | None = Field(None, ge=0, description="Download rate over the last seconds.")
    eta_seconds: float | None = Field(None, ge=0, description="Seconds left at that rate.")
    revision: str | None = Field(None, description="The commit the model's revision resolved to.")
    job: str | None = Field(None, description="The Job that downloads (or downloaded) the model; LLMDeployments on "
                            "one claim share it.")
    message: str | None = Field(None, description="What happens, or why the download failed, for a person.")


# The annotation that asks for a serving benchmark: a BenchmarkRequest as JSON (`vllm-operator bench` writes it).
BENCHMARK_ANNOTATION = f"{GROUP}/benchmark"
BENCHMARK_ID_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
RANDOM_DEFAULT_INPUT_LEN = 1024  # vLLM's own defaults for the random dataset
RANDOM_DEFAULT_OUTPUT_LEN = 128
DATASET_PATH_MESSAGE = (
    "datasetPath is a file on the model cache volume, relative to its root (e.g. datasets/sharegpt.json), "
    "without '..'"
)


class BenchmarkSettings(ApiModel):
    """How vLLM's serving benchmark (vllm bench serve) loads the LLMDeployment."""

    dataset: Literal["random", "sharegpt"] = Field(
        "random", description="Prompts: random (token ids of inputLen tokens) or sharegpt (a ShareGPT-style JSON "
        "file on the model cache volume, see datasetPath). Default: random."
    )
    dataset_path: str | None = Field(
        None, description="For dataset sharegpt: the file, relative to the root of the model cache volume.",
        min_length=1, max_length=1024,
    )
    num_prompts: int = Field(100, description="Requests to send. Default: 100.", ge=1, le=10000)
    request_rate: float | None = Field(
        None, description="Requests a second, arriving as a Poisson process. Default: all at once.", gt=0, le=10000
    )
    max_concurrency: int | None = Field(
        None, description="Most requests in flight at once. Default: no limit.", ge=1, le=10000
    )
    input_len: int | None = Field(
        None, description="For dataset random: prompt tokens per request. Default: 1024.", ge=1, le=1048576
    )
    output_len: int | None = Field(
        None, description="Generated tokens per request. Default: 128 for random, the dataset's for sharegpt.",
        ge=1, le=1048576,
    )

    @model_validator(mode="after")
    def _check_dataset(self) -> BenchmarkSettings:
        if self.dataset == "random" and self.dataset_path is not None:
            raise ValueError("datasetPath applies to dataset sharegpt only; the random dataset makes its own prompts")
        if self.dataset == "sharegpt":
            if self.dataset_path is None:
                raise ValueError("dataset sharegpt needs datasetPath, a ShareGPT-style JSON file on the cache volume")
            if self.dataset_path.startswith("/") or ".." in self.dataset_path.split("/"):
                raise ValueError(DATASET_PATH_MESSAGE)
            if self.input_len is not None:
                raise ValueError("inputLen applies to dataset random only: ShareGPT prompts keep their own length")
        return self

    def resolved(self) -> BenchmarkSettings:
        """These settings with vLLM's defaults written out, as the status shows them."""
        if self.dataset != "random":
            return self
        return self.model_copy(update={"input_len": self.input_len or RANDOM_DEFAULT_INPUT_LEN,
                                       "output_len": self.output_len or RANDOM_DEFAULT_OUTPUT_LEN})


class BenchmarkRequest(BenchmarkSettings):
    """A benchmark asked for in the annotation llm.vllm-operator.io/benchmark; a new id asks for a new run."""

    id: str = Field(
        description="Names this request; the operator runs each id once.",
        min_length=1, max_length=63, pattern=BENCHMARK_ID_PATTERN,
    )


class BenchmarkResults(ApiModel):
    """The headline figures of a finished benchmark, as vllm bench serve measured them."""

    completed_requests: int = Field(ge=0, description="Requests that finished with an answer.")
    failed_requests: int = Field(ge=0, description="Requests that failed (errors).")
    duration_seconds: float = Field(ge=0, description="How long the benchmark sent requests, in seconds.")
    request_throughput: float = Field(ge=0, description="Completed requests a second.")
    output_tokens_per_second: float = Field(ge=0, description="Generated tokens a second.")
    ttft_seconds_p50: float | None = Field(None, ge=0, description="Median time to first token, in seconds.")
    ttft_seconds_p99: float | None = Field(None, ge=0, description="99th percentile time to first token, in seconds.")
    itl_seconds_p50: float | None = Field(None, ge=0, description="Median time between tokens, in seconds.")
    itl_seconds_p99: float | None = Field(None, ge=0, description="99th percentile time between tokens, in seconds.")
    first_error: str | None = Field(None, description="The error of one failed request, when any failed.")


BenchmarkPhase = Literal["Waiting", "Running", "Succeeded", "Failed"]


class BenchmarkRun(ApiModel):
    """One benchmark request and, once it ran, its result."""

    id: str = Field(description="The request's id (from the llm.vllm-operator.io/benchmark annotation).")
    phase: BenchmarkPhase = Field(
        description="Waiting (for the LLMDeployment to be Ready, or for the running benchmark), Running, "
        "Succeeded or Failed."
    )
    message: str = Field(description="What happens or happened, for a person.")
    settings: BenchmarkSettings | None = Field(None, description="The settings of the run; absent when invalid.")
    job: str | None = Field(None, description="The Job that runs or ran the benchmark.")
    start_time: str | None = Field(None, description="When the benchmark started (RFC 3339).")
    completion_time: str | None = Field(None, description="When it finished (RFC 3339).")
    results: BenchmarkResults | None = Field(None, description="The headline figures, once it finished.")
    report: str | None = Field(None, description="The ConfigMap holding the full report of the last finished run.")


class BenchmarkStatus(BenchmarkRun):
    """The latest benchmark request and, once it ran, its result."""

    previous: BenchmarkRun | None = Field(
        None, description="The request before this one, once it finished: kept while the next one waits and runs, "
        "so that its result does not leave the status the moment a waiting request starts."
    )


class ReplicaStartup(ApiModel):
    """Where one starting engine replica is, from its log."""

    pod: str = Field(description="The engine Pod.")
    stage: StartupStage = Field(
        description="Starting (the engine process is starting), LoadingWeights, Profiling (memory, and sizing the KV "
        "cache), Compiling (torch.compile, warm-up), CapturingGraphs (CUDA/HIP graphs) or StartingServer (the API "
        "server comes up; Ready follows)."
    )
    since: str = Field(description="When the operator first saw the replica in this stage (RFC 3339).")


class StartupStatus(ApiModel):
    """The replicas still starting; absent once all are Ready."""

    replicas: list[ReplicaStartup] = Field(
        description="Each starting replica's stage.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["pod"]},
    )


class AdapterStatus(ApiModel):
    """Where one LoRA adapter of spec.adapters is loaded."""

    name: str = Field(description="The adapter's name in spec.adapters.")
    state: Literal["Downloading", "Loaded", "Loading", "Failed"] = Field(
        description="Downloading: from the hub into the cache claim (download says how far). Loaded: in every "
        "running engine. Loading: on its way into some. Failed: its download failed, or an engine refused it "
        "(message says why); a refused load is tried again after a while, and when its spec entry changes."
    )
    loaded_replicas: int = Field(ge=0, description="Running engines that have it loaded.")
    replicas: int = Field(ge=0, description="Running engines that should have it.")
    message: str | None = Field(None, description="The engine's answer when a load failed, or why the download did.")
    download: CacheStatus | None = Field(None, description="The download of an adapter from the hub (hf://).")


MemberState = Literal["Ready", "Running", "Pending", "Unschedulable", "Failed", "Terminating"]


class GroupMember(ApiModel):
    """One Pod of a replica across nodes."""

    pod: str = Field(description="The Pod's name.")
    role: Literal["leader", "worker"] = Field(description="leader: node rank 0, serves the API; worker: headless.")
    rank: int = Field(description="The node rank (the LeaderWorkerSet worker index; 0 is the leader).", ge=0)
    node: str | None = Field(None, description="The node it runs on, once scheduled.")
    state: MemberState = Field(
        description="Ready (leader: the engine answers), Running, Pending (not started yet), Unschedulable, Failed "
        "(its container crashed or cannot start) or Terminating."
    )
    message: str | None = Field(None, description="Why it is not running, in the scheduler's or the engine's words.")


class ReplicaGroup(ApiModel):
    """One replica across nodes: a LeaderWorkerSet group, leader and workers."""

    index: int = Field(description="The group's index (the LeaderWorkerSet group index).", ge=0)
    ready: bool = Field(description="The leader is Ready and every worker runs.")
    workers_ready: str = Field(description="Workers running / workers the group needs.")
    members: list[GroupMember] = Field(
        description="Every Pod of the group, by rank.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["pod"]},
    )
    message: str | None = Field(None, description="The first member that holds the group back, and why.")


class LLMDeploymentStatus(ApiModel):
    """Observed state of an LLMDeployment, written by the operator."""

    phase: Phase | None = Field(
        None, description="Pending, Downloading (the model into the cache), Loading, Ready, Idle (scaled to zero by "
        "the autoscaler), Degraded or Failed."
    )
    replicas: int | None = Field(None, description="Engine replicas that exist (Pods, or groups across nodes).")
    ready_replicas: int | None = Field(None, description="Engine replicas that are Ready.")
    ready: str | None = Field(None, description="Ready replicas / desired replicas, for kubectl get.")
    selector: str | None = Field(None, description="Label selector of the engine Pods (for the scale subresource).")
    observed_generation: int | None = Field(None, description="The metadata.generation the status describes.")
    endpoint: str | None = Field(None, description="In-cluster base URL of the OpenAI-compatible API.")
    model: str | None = Field(None, description="Model name clients use in API requests.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing, Degraded and Unschedulable conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    engine: EngineStats | None = Field(None, description="Live engine load from the replicas' /metrics.")
    autoscaling: AutoscalingStatus | None = Field(None, description="The built-in autoscaler's decision, when "
                                                  "spec.autoscaling is set.")
    benchmark: BenchmarkStatus | None = Field(
        None, description="The latest serving benchmark asked for with the llm.vllm-operator.io/benchmark annotation."
    )
    capacity: CapacityStatus | None = Field(
        None, description="The fit check of a Hugging Face model: whether it fits, and the KV-cache tokens it leaves."
    )
    cache: CacheStatus | None = Field(
        None, description="The download of a Hugging Face model into the cache claim, before the engines start."
    )
    startup: StartupStatus | None = Field(
        None, description="The stage each starting engine replica is in, read from its log, while any is starting."
    )
    adapters: list[AdapterStatus] | None = Field(
        None, description="Each LoRA adapter of spec.adapters: in how many running engines it is loaded, or why not.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    loaded_adapters: int | None = Field(
        None, description="Adapters of spec.adapters loaded in every running engine, for kubectl get."
    )
    groups: list[ReplicaGroup] | None = Field(
        None, description="With accelerator.nodesPerReplica > 1: each replica's group, the node of each member, and "
        "which member holds a group back.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["index"]},
    )


def parse_model_source(name: str) -> tuple[str, str, str]:
    """Split spec.model.name into (kind, claim, path) where kind is hf, pvc or file.

    Raises ValueError with a message for the user when the name fits none of them.
    """
    if name.startswith("pvc://"):
        if not re.fullmatch(PVC_MODEL_PATTERN, name):
            raise ValueError("model.name pvc://<claim>/<path> needs a claim name (lowercase letters, digits and '-')")
        claim, _, path = name[len("pvc://"):].partition("/")
        return "pvc", claim, path
    if name.startswith("file:///"):
        return "file", "", name[len("file://"):]
    if "://" in name or not re.fullmatch(HF_REPO_ID_PATTERN, name):
        raise ValueError(
            "model.name must be a Hugging Face repo id (org/name), pvc://<claim>/<path> or file:///<absolute path>"
        )
    return "hf", "", name


def adapter_source(source: str) -> tuple[str, str, str]:
    """Split adapters[].source into (kind, claim, path): ("hf", "", repo id), ("pvc", claim, path on it) or
    ("file", "", absolute path).

    Raises ValueError with a message for the user when it fits none.
    """
    if not re.match(ADAPTER_SOURCE_FORM, source) or re.search(PARENT_SEGMENT, source):
        raise ValueError(ADAPTER_SOURCE_MESSAGE)
    if source.startswith("hf://"):
        if not re.fullmatch(HF_ADAPTER, source):  # RE2's $ is the end of the text; Python's allows a final newline
            raise ValueError(ADAPTER_SOURCE_MESSAGE)
        return "hf", "", source[len("hf://"):]
    if source.startswith("pvc://"):
        claim, _, path = source[len("pvc://"):].partition("/")
        return "pvc", claim, path
    return "file", "", source[len("file://"):]


def lora_enabled(spec: LLMDeploymentSpec) -> bool:
    """Whether the engines start with LoRA on: only then can adapters be loaded at run time."""
    return bool(spec.adapters) or spec.engine.max_loras is not None


def adapter_name_clash(spec: LLMDeploymentSpec, name: str | None) -> str | None:
    """The twin of ADAPTER_CLASH_RULE: the message when an adapter takes the served name (metadata.name
    ``name`` when model.servedName is unset; None where the spec is judged without its object)."""
    served = spec.model.served_name or name
    return ADAPTER_CLASH_MESSAGE if any(adapter.name == served for adapter in spec.adapters) else None


def name_too_long_across_nodes(spec: LLMDeploymentSpec, name: str) -> str | None:
    """The twin of NODES_NAME_RULE: the message when a replica across nodes has too long a name."""
    return NODES_NAME_MESSAGE if spec.accelerator.nodes > 1 and len(name) > MAX_NAME_LENGTH_ACROSS_NODES else None


TRUE_VALUES = ("1", "true", "yes", "on")


def hub_offline(spec: LLMDeploymentSpec) -> bool:
    """Whether spec.engine.env tells the engines to stay off the hub: their cache is filled by other means."""
    return any(var.name == "HF_HUB_OFFLINE" and (var.value or "").strip().lower() in TRUE_VALUES
               for var in spec.engine.env)


def pulls_model(spec: LLMDeploymentSpec) -> bool:
    """Whether a download Job fills the cache claim before the engines start (which then stay offline).

    Not for a tokenizer from another repo: the Job fetches one repo, and offline engines could not get it.
    """
    tokenizer = spec.model.tokenizer
    other_tokenizer = tokenizer is not None and tokenizer != spec.model.name and not tokenizer.startswith("/") \
        and re.fullmatch(HF_REPO_ID_PATTERN, tokenizer) is not None
    return (spec.cache.enabled and parse_model_source(spec.model.name)[0] == "hf" and not hub_offline(spec)
            and not other_tokenizer)


def download_patterns(model: ModelSpec) -> tuple[list[str], list[str]]:
    """The allow and ignore globs of the download, defaults filled in."""
    return (list(model.allow_patterns or DEFAULT_ALLOW_PATTERNS), list(model.ignore_patterns or DEFAULT_IGNORE_PATTERNS))
