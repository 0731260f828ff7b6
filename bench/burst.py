"""Many LLMDeployments applied at once: time until each has its children and a current status."""

from __future__ import annotations

import asyncio
import time

from bench.report import Row
from bench.rig import Rig, cpu_seconds, llmdeployment
from bench.sizes import Size
from bench.tracker import Tracker

TARGET_SECONDS = 20.0
TARGET_SIZE = 1000


def namespace_for(count: int) -> str:
    return f"bench-burst-{count}"


def method(size: Size) -> str:
    counts = " and ".join(f"{n:,}" for n in size.bursts)
    return (f"**burst**: {counts} LLMDeployments applied at once (concurrent server-side applies, 64 connections), "
            "each in a fresh namespace. Timed from the first apply until the last LLMDeployment has every child "
            "and `status.observedGeneration` equal to its `metadata.generation`, both seen on watches. Operator CPU "
            "is user + system time of its process (`/proc/<pid>/stat`) over the same span. "
            f"The target is for {TARGET_SIZE:,}.")


async def measure(rig: Rig, tracker: Tracker, namespace: str, count: int) -> Row:
    manifests = [llmdeployment(f"llmd-{i:04d}", namespace) for i in range(count)]
    cpu_before = cpu_seconds(rig.operator_pid)
    started = time.monotonic()
    await asyncio.gather(*(rig.kube.apply_llmdeployment(manifest) for manifest in manifests))
    sent = time.monotonic() - started
    await tracker.wait(f"{count} LLMDeployments with children and a current status",
                       lambda: len(tracker.done_at) >= count, max(120.0, count * 0.5))
    cpu = cpu_seconds(rig.operator_pid) - cpu_before
    took = max(tracker.done_at.values()) - started
    rig.out(f"  burst of {count}: done in {took:.1f}s (applies sent in {sent:.1f}s), operator CPU {cpu:.1f}s")
    return Row(f"burst of {count:,}: children + current status; operator CPU",
               f"{took:.1f} s; CPU {cpu:.1f} s",
               f"<= {TARGET_SECONDS:g} s for {TARGET_SIZE:,}",
               took <= TARGET_SECONDS if count == TARGET_SIZE else None)
