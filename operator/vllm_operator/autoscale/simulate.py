"""The autoscaler in simulated time, for the tests and ``make bench``: hours of scrapes in milliseconds.

One LLMDeployment whose Deployment follows spec.replicas at once (up to ``quota`` Pods), whose Pods serve
``load_seconds`` after they were created, and whose every scrape feeds the real :class:`Autoscaler` with the
load a function of time gives the serving replicas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_operator.api import AutoscalingSpec
from vllm_operator.autoscale.decide import Autoscaler, Decision, LoadSample

Load = Callable[[float], dict[str, Any]]  # time -> LoadSample fields of the serving replicas
SCRAPE_SECONDS = 15.0  # the operator's default --scrape-interval


def sample(at: float = 0.0, ready: int = 1, **load: Any) -> LoadSample:
    """A sweep's sample; load fields left out are 0."""
    fields = {"requests_running": 0, "requests_waiting": 0, "kv_cache_usage_percent": 0.0,
              "generation_tokens_per_second": 0.0, **load}
    return LoadSample(at=at, ready_replicas=ready, **fields)


@dataclass
class Simulation:
    spec: AutoscalingSpec
    replicas: int
    load_seconds: float = 30.0
    quota: int = 1000
    scrape_seconds: float = SCRAPE_SECONDS
    now: float = 0.0
    changes: list[tuple[float, int, int]] = field(default_factory=list)  # (time, from, to)
    decisions: list[Decision] = field(default_factory=list)
    counts: list[tuple[float, int]] = field(default_factory=list)  # (time, spec.replicas after the decision)

    def __post_init__(self) -> None:
        self.autoscaler = Autoscaler(self.spec)
        self.pods = [-math.inf] * self.replicas  # creation times; these serve from the start

    def run(self, seconds: float, load: Load) -> None:
        end = self.now + seconds
        while self.now < end:
            wanted = min(self.replicas, self.quota)
            del self.pods[wanted:]
            self.pods += [self.now] * (wanted - len(self.pods))
            ready = sum(1 for created in self.pods if self.now - created >= self.load_seconds)
            self.autoscaler.observe(sample(self.now, ready, **(load(self.now) if ready else {})))
            decision = self.autoscaler.decide(self.replicas, len(self.pods), self.now)
            self.decisions.append(decision)
            if decision.desired != self.replicas:
                self.changes.append((self.now, self.replicas, decision.desired))
            self.replicas = decision.desired
            self.counts.append((self.now, self.replicas))
            self.now += self.scrape_seconds

    def first_time(self, replicas: int) -> float:
        return next(at for at, count in self.counts if count == replicas)
