"""How big each measurement is: the full size, or ``BENCH_SIZE=small`` for a run of a few minutes."""

from __future__ import annotations

import os
from dataclasses import dataclass

SIZE_ENV = "BENCH_SIZE"


@dataclass(frozen=True)
class Size:
    name: str
    applies: int  # single applies timed one after another
    bursts: tuple[int, ...]  # LLMDeployments applied at once; the last burst stays as the fleet
    window: float  # seconds of the idle and of the busy window
    engine_starts: int  # cold and warm vLLM starts each
    growth: tuple[int, ...]  # LLMDeployments the fleet then grows to, for the memory slope
    autoscale_steps: int  # load steps the autoscaler reacts to
    gateway_requests: int  # requests timed one at a time on each path, to the gateway and straight to the engine
    gateway_seconds: float  # seconds each path is loaded for its rate

    @property
    def fleet(self) -> int:
        return self.bursts[-1]

    def largest(self, memory: bool) -> int:
        """The most LLMDeployments that exist at once, with or without the memory slope."""
        return max(self.fleet, *self.growth) if memory else self.fleet


SIZES = {
    "full": Size("full", applies=200, bursts=(100, 1000), window=60.0, engine_starts=3, growth=(2000, 5000),
                 autoscale_steps=3, gateway_requests=5000, gateway_seconds=30.0),
    "small": Size("small", applies=20, bursts=(20, 50), window=30.0, engine_starts=1, growth=(100, 200),
                  autoscale_steps=1, gateway_requests=1000, gateway_seconds=9.0),
}


def from_env() -> Size:
    name = os.environ.get(SIZE_ENV, "full")
    if name not in SIZES:
        raise SystemExit(f"{SIZE_ENV}={name!r}: choose one of {', '.join(SIZES)}")
    return SIZES[name]
