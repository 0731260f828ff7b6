"""Accelerator profiles: everything that differs between NVIDIA, AMD, Intel Gaudi, Intel GPU and CPU nodes.

Adding a backend means adding one profile here (and its tests); the manifest and argument
builders read nothing accelerator-specific from anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from vllm_operator.render.vllm_flags import VLLM_VERSION


@dataclass(frozen=True)
class AcceleratorProfile:
    type: str
    image: str
    # Extended resource the device plugin advertises; None for CPU.
    resource_name: str | None
    # Node label that identifies the GPU model, used for spec.accelerator.product.
    product_label: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, str], ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    # Engine defaults that differ from vLLM's own on this hardware.
    default_block_size: int | None = None
    # CUDA/HIP graph capture exists on this backend (spec.engine.cudaGraph applies).
    graph_capture: bool = False
    # Devices are scarce: a rollout never asks for more than the replicas already hold.
    scarce: bool = True
    # engine.backend openvino: its image and VLLM_OPENVINO_DEVICE; None where OpenVINO does not run.
    openvino_image: str | None = None
    openvino_device: str | None = None
    # Seconds a start takes besides reading the weights: imports, compilation, warm-up, graph capture.
    startup_seconds: int = 15 * 60
    # A replica across nodes: how its nodes join (engine.distributedBackend's default), and the environment its
    # collectives need to find the Pod's network (eth0 is the Pod network; engine.env names another).
    multinode_backend: str = "mp"
    multinode_env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(_POD_NETWORK))


# gloo carries the CPU-side collectives of every backend (and all of them on CPUs).
_POD_NETWORK = {"GLOO_SOCKET_IFNAME": "eth0"}


def _network(**env: str) -> Mapping[str, str]:
    return MappingProxyType({**_POD_NETWORK, **env})


def _tolerate(*keys: str) -> tuple[Mapping[str, str], ...]:
    return tuple(MappingProxyType({"key": key, "operator": "Exists", "effect": "NoSchedule"}) for key in keys)


# Intel's GPU device plugin names its resource after the kernel driver of the cards: i915, or the newer xe.
INTEL_GPU_RESOURCES: Mapping[str, str] = MappingProxyType({"i915": "gpu.intel.com/i915", "xe": "gpu.intel.com/xe"})


PROFILES: Mapping[str, AcceleratorProfile] = MappingProxyType({
    "nvidia": AcceleratorProfile(
        type="nvidia",
        image=f"vllm/vllm-openai:v{VLLM_VERSION}",
        resource_name="nvidia.com/gpu",
        product_label="nvidia.com/gpu.product",
        tolerations=_tolerate("nvidia.com/gpu"),
        graph_capture=True,
        multinode_env=_network(NCCL_SOCKET_IFNAME="eth0"),
    ),
    "amd": AcceleratorProfile(
        type="amd",
        image=f"vllm/vllm-openai-rocm:v{VLLM_VERSION}",
        resource_name="amd.com/gpu",
        product_label="amd.com/gpu.product-name",
        tolerations=_tolerate("amd.com/gpu"),
        graph_capture=True,
        startup_seconds=20 * 60,  # ROCm's kernels are tuned and compiled on the first start
        multinode_env=_network(NCCL_SOCKET_IFNAME="eth0"),  # RCCL reads NCCL's variables
    ),
    "gaudi": AcceleratorProfile(
        type="gaudi",
        image="opea/vllm-gaudi:1.4",
        resource_name="habana.ai/gaudi",
        tolerations=_tolerate("habana.ai/gaudi"),
        env=MappingProxyType({
            "HABANA_VISIBLE_DEVICES": "all",
            "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
            # Tensor parallel collectives on HPU need lazy collectives enabled.
            "PT_HPU_ENABLE_LAZY_COLLECTIVES": "true",
        }),
        # The Gaudi runtime pins its threads, which needs SYS_NICE.
        capabilities=("SYS_NICE",),
        default_block_size=128,
        startup_seconds=45 * 60,  # HPU graph warm-up over every bucket of batch and sequence length
        # vLLM on Gaudi spans nodes through Ray; HCCL finds its peers on the Pod network.
        multinode_backend="ray",
        multinode_env=_network(HCCL_SOCKET_IFNAME="eth0"),
    ),
    "intel-gpu": AcceleratorProfile(
        type="intel-gpu",
        image=f"vllm/vllm-openai-xpu:v{VLLM_VERSION}",
        resource_name=INTEL_GPU_RESOURCES["i915"],
        product_label="gpu.intel.com/product",
        tolerations=_tolerate(*INTEL_GPU_RESOURCES.values()),
        # No environment of its own: vLLM's XPU platform picks spawned workers itself, and ZE_AFFINITY_MASK (its
        # device mask) stays unset because the device plugin exposes only the cards it allocated to the Pod.
        openvino_image="opea/vllm-arc:latest",
        # The device plugin exposes only the cards it allocated, so the first GPU is the Pod's.
        openvino_device="GPU",
        startup_seconds=20 * 60,
        multinode_backend="ray",  # vLLM's XPU platform spans nodes through Ray
    ),
    "cpu": AcceleratorProfile(
        type="cpu",
        image=f"public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v{VLLM_VERSION}",
        resource_name=None,
        # The CPU build cannot load the compile artifacts it saves in its default (AOT) format
        # ("'function' object has no attribute 'finalize_loading'") and compiles again on every
        # start; without AOT, inductor's cache on the volume serves a restart.
        env=MappingProxyType({"VLLM_USE_AOT_COMPILE": "0"}),
        scarce=False,
        openvino_image="opea/vllm-openvino:1.1",
        openvino_device="CPU",
        startup_seconds=10 * 60,
    ),
})

CPU_KV_CACHE_SPACE_GIB_DEFAULT = 4


def profile_for(accelerator_type: str) -> AcceleratorProfile:
    return PROFILES[accelerator_type]


def device_resource(accelerator_type: str, intel_gpu_resource: str | None) -> str | None:
    """The extended resource one replica's devices are requested as (None for CPU)."""
    if accelerator_type == "intel-gpu" and intel_gpu_resource is not None:
        return INTEL_GPU_RESOURCES[intel_gpu_resource]
    return profile_for(accelerator_type).resource_name
