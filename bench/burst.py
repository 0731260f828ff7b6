"""Many LLMDeployments applied at once: time until each has its children and a current status."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from bench.kube import Obj
from bench.report import Row
from bench.rig import Rig, cpu_seconds, llmdeployment
from bench.sizes import Size
from bench.tracker import Tracker
from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.kube import object_path
from vllm_operator.render.manifests import SELECTOR_LABEL, Owner, children

# On 2 cores the control plane itself is the limit, so the target is relative to its floor in the same run.
TARGET_RATIO = 1.2
TARGET_SIZE = 1000
CONNECTIONS = 64
# The floor's children carry this label instead of the operator's, so the operator never sees them.
FLOOR_LABEL = "vllm-operator.io/bench-floor"


def namespace_for(count: int) -> str:
    return f"bench-burst-{count}"


def floor_namespace_for(count: int) -> str:
    return f"bench-floor-{count}"


def method(size: Size) -> str:
    counts = " and ".join(f"{n:,}" for n in size.bursts)
    return (f"**burst**: {counts} LLMDeployments applied at once (concurrent server-side applies, "
            f"{CONNECTIONS} connections), each in a fresh namespace. Timed from the first apply until the last "
            "LLMDeployment has every child and `status.observedGeneration` equal to its `metadata.generation`, "
            "both seen on watches. Operator CPU is user + system time of its process (`/proc/<pid>/stat`) over "
            f"the same span. The target is for {TARGET_SIZE:,}: at most {TARGET_RATIO:g} times the control-plane "
            "floor below, measured in the same run; the ratio is shown for every burst as large as that floor.\n\n"
            f"**control-plane floor**: the children of {size.fleet:,} LLMDeployments, exactly as the operator "
            f"renders them, applied at once by the benchmark itself over {CONNECTIONS} connections, with no "
            "operator and no LLMDeployments; timed until the last apply returns. This is how fast the cluster "
            "takes those objects from any client, so no operator can finish a burst sooner. Every ClusterIP "
            "Service is a step in one queue: kube-apiserver allocates cluster IPs one at a time, each holding a "
            "lock across the write of an IPAddress object.")


@dataclass(frozen=True)
class Floor:
    count: int  # LLMDeployments whose children were applied
    seconds: float

    def row(self) -> Row:
        return Row(f"control-plane floor: children of {self.count:,} applied directly, no operator",
                   f"{self.seconds:.1f} s")


@dataclass(frozen=True)
class Burst:
    count: int
    seconds: float
    cpu: float  # the operator's, over the same span

    def row(self, floor: Floor | None) -> Row:
        """Judged against the floor for as many LLMDeployments, when this run measured one."""
        ratio = self.seconds / floor.seconds if floor is not None and floor.count == self.count else None
        versus = "" if ratio is None else f" ({ratio:.2f}x floor)"
        judged = self.count == TARGET_SIZE and ratio is not None
        return Row(f"burst of {self.count:,}: children + current status; operator CPU",
                   f"{self.seconds:.1f} s{versus}; CPU {self.cpu:.1f} s",
                   f"<= {TARGET_RATIO:g}x floor for {TARGET_SIZE:,}",
                   ratio <= TARGET_RATIO if judged else None)


async def measure(rig: Rig, tracker: Tracker, namespace: str, count: int, start: int = 0) -> Burst:
    """Apply LLMDeployments ``start`` up to ``count`` at once (the ones before exist already) and time them."""
    manifests = [llmdeployment(f"llmd-{i:04d}", namespace) for i in range(start, count)]
    cpu_before = cpu_seconds(rig.operator_pid)
    started = time.monotonic()
    await asyncio.gather(*(rig.kube.apply_llmdeployment(manifest) for manifest in manifests))
    sent = time.monotonic() - started
    await tracker.wait(f"{count} LLMDeployments with children and a current status",
                       lambda: len(tracker.done_at) >= count, max(120.0, len(manifests) * 0.5))
    cpu = cpu_seconds(rig.operator_pid) - cpu_before
    took = max(tracker.done_at.values()) - started
    rig.out(f"  burst of {len(manifests)}: done in {took:.1f}s (applies sent in {sent:.1f}s), operator CPU {cpu:.1f}s")
    return Burst(len(manifests), took, cpu)


def floor_children(namespace: str, count: int) -> list[Obj]:
    """What the operator would apply for ``count`` LLMDeployments, without owners and out of its sight."""
    found = []
    for i in range(count):
        manifest = llmdeployment(f"llmd-{i:04d}", namespace)
        spec = LLMDeploymentSpec.model_validate(manifest["spec"])
        for child in children(spec, Owner(manifest["metadata"]["name"], namespace, "")).values():
            if child is not None:
                child["metadata"].pop("ownerReferences", None)
                found.append(json.loads(json.dumps(child).replace(json.dumps(SELECTOR_LABEL), json.dumps(FLOOR_LABEL))))
    return found


async def measure_floor(rig: Rig, namespace: str, count: int) -> Floor:
    objects = floor_children(namespace, count)
    slots = asyncio.Semaphore(CONNECTIONS)

    async def apply(child: Obj) -> None:
        async with slots:
            await rig.kube.apply_at(object_path(child["kind"], namespace, child["metadata"]["name"]), child)

    started = time.monotonic()
    await asyncio.gather(*(apply(child) for child in objects))
    took = time.monotonic() - started
    rig.out(f"  control-plane floor for {count}: {len(objects)} children applied in {took:.1f}s")
    return Floor(count, took)
