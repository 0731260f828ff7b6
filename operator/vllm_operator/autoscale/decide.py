"""How many replicas an LLMDeployment's load asks for: the HPA's algorithm, on the engines' own signals.

A decision

1. averages the samples of the last ``WINDOW_SECONDS`` into one total per target metric and asks for
   ceil(total / value) replicas per target; the largest ask wins, clamped to [minReplicas, maxReplicas].
   A total does not grow with the replica count, so replicas still loading are capacity that is coming:
   while they load, a burst keeps asking for the same count instead of one more replica per scrape.
   No request in the window asks for no replica (minReplicas still holds).
2. stabilizes as the HPA does: up to the lowest recommendation of the scale-up window, down to the
   highest of the scale-down window. The first decision counts the current count as a recommendation
   already made, so an operator restart does not scale down on one window of samples.
3. goes at most maxScaleUpStep / maxScaleDownStep from the replicas that *exist*: replicas asked for but
   not created yet (quota, a Deployment catching up) do not compound, and one scale-down finishes
   before the next starts.
4. holds any scale-down for scaleDownDelaySeconds after its own last scale-up, and holds the last
   replica until no request ran or waited for scaleToZeroAfterSeconds of unbroken watching.
5. keeps the count while the latest sweep found no replica serving: there is no load to measure.

Pure: no I/O and no clocks; the caller passes monotonic seconds.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from vllm_operator.api import AutoscalingSpec

# Two scrapes at the default --scrape-interval of 15 s: one odd scrape moves the average half-way, and
# a load step is fully seen within 30 s. Longer would only delay scale-up: keeping replicas through
# load that comes and goes is the scale-down window's job (300 s by default), not the average's.
WINDOW_SECONDS = 30.0
# With a --scrape-interval above WINDOW_SECONDS, still average two scrapes rather than trust one.
MIN_WINDOW_SAMPLES = 2
# Float totals such as 3 x 16.0 / 16 must not ask for one replica more.
_EPSILON = 1e-9


@dataclass(frozen=True)
class LoadSample:
    """One scrape sweep of an LLMDeployment's engines."""

    at: float  # seconds, monotonic
    requests_running: int  # summed over scraped replicas
    requests_waiting: int
    kv_cache_usage_percent: float  # fullest replica
    generation_tokens_per_second: float
    ready_replicas: int  # replicas scraped (serving); 0 when none answered


@dataclass(frozen=True)
class Decision:
    """What to set spec.replicas to, and why."""

    desired: int
    reason: str  # a sentence for Events and status, e.g. "requestsPerReplica 42.0 asks for 3 ...: 1 -> 3"
    metrics: dict[str, float]  # metric -> the windowed value used, as status.engine shows it
    current: int | None = None  # the spec.replicas it was decided for (set by Autoscaler.decide)
    measured: bool = True  # False while no load was measured: keeping the count then is no opinion of it


# Each metric as the engines report it (and status.engine shows it).
_REPORTED: dict[str, Callable[[LoadSample], float]] = {
    "requestsPerReplica": lambda s: s.requests_running + s.requests_waiting,
    "waitingRequests": lambda s: s.requests_waiting,
    "kvCacheUsagePercent": lambda s: s.kv_cache_usage_percent,
    "generationTokensPerSecond": lambda s: s.generation_tokens_per_second,
}


def _total(metric: str, sample: LoadSample) -> float:
    """What the serving replicas carry together; KV-cache use is per replica, the fullest standing for each."""
    value = _REPORTED[metric](sample)
    return value * sample.ready_replicas if metric == "kvCacheUsagePercent" else value


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _busy(sample: LoadSample) -> bool:
    return sample.requests_running + sample.requests_waiting > 0


def _replicas(count: int) -> str:
    return f"{count} replica" if count == 1 else f"{count} replicas"


def step_size(step: int | str, existing: int) -> int:
    """Replicas one step may add or remove: a number, or a percentage of ``existing`` rounded up; at least 1."""
    if isinstance(step, str):
        return max(1, math.ceil(existing * int(step.rstrip("%")) / 100))
    return step


class Autoscaler:
    """The autoscaling state of one LLMDeployment: recent samples, recommendations and its last scale-up."""

    def __init__(self, spec: AutoscalingSpec) -> None:
        self._spec = spec
        self._samples: deque[LoadSample] = deque()
        self._recommendations: deque[tuple[float, int]] = deque()  # (at, replicas)
        self._watched_since: float | None = None  # start of the current unbroken run of samples with a replica serving
        self._busy_at: float | None = None  # last sample with a request running or waiting
        self._scaled_up_at: float | None = None

    def update_spec(self, spec: AutoscalingSpec) -> None:
        self._spec = spec

    def wake(self) -> None:
        """spec.replicas was raised from zero by someone else (kubectl scale, a gateway): what was measured before
        says nothing of the load that woke it, so decisions start over from the next sample."""
        self._samples.clear()
        self._recommendations.clear()
        self._watched_since = None

    def observe(self, sample: LoadSample) -> None:
        """Record one sweep. Call it every sweep, also when no replica answered (ready_replicas 0): otherwise the
        last samples of a replica that went away would stand for the load, e.g. after a wake from zero."""
        if sample.ready_replicas == 0:
            self._watched_since = None  # unseen requests may have come and gone: idleness starts over
        else:
            if self._watched_since is None:
                self._watched_since = sample.at
            if _busy(sample):
                self._busy_at = sample.at
        self._samples.append(sample)
        while len(self._samples) > MIN_WINDOW_SAMPLES and self._samples[0].at <= sample.at - WINDOW_SECONDS:
            self._samples.popleft()

    def decide(self, current: int, existing: int, now: float) -> Decision:
        """The replica count for now. ``current`` is spec.replicas; ``existing`` counts replicas that exist,
        ready or still loading."""
        return replace(self._decide(current, existing, now), current=current)

    def _decide(self, current: int, existing: int, now: float) -> Decision:
        spec, behavior = self._spec, self._spec.behavior
        window = self._window(now)
        metrics = {t.metric: _mean([_REPORTED[t.metric](s) for s in window]) for t in spec.targets} if window else {}
        if not spec.min_replicas <= current <= spec.max_replicas:
            desired = min(max(current, spec.min_replicas), spec.max_replicas)
            return self._decided(current, desired, now, metrics,
                                 f"spec.replicas {current} is outside minReplicas {spec.min_replicas} and "
                                 f"maxReplicas {spec.max_replicas}: {current} -> {desired}")
        if not window:
            self._remember(now, current)
            return Decision(current, f"no replica is serving, so there is no load to measure: keeping {current}",
                            metrics, measured=False)

        if not self._recommendations:
            self._recommendations.append((now, current))  # what the count was before we watched
        ask, cause = self._ask(window, metrics)
        recommended = min(max(ask, spec.min_replicas), spec.max_replicas)
        if recommended != ask:
            cause += f", bounded by {'maxReplicas' if ask > recommended else 'minReplicas'} {recommended}"
        up = min([recommended, *self._since(now - behavior.scale_up_stabilization_seconds)])
        down = max([recommended, *self._since(now - behavior.scale_down_stabilization_seconds)])
        self._remember(now, recommended)
        stabilized = min(max(current, up), down)
        if stabilized == 0 and (idle := self._idle_for(now)) < (behavior.scale_to_zero_after_seconds or 0):
            stabilized = 1
            if current == 1:
                return Decision(1, f"{cause}; keeping 1 until no request ran or waited for "
                                   f"{behavior.scale_to_zero_after_seconds} s ({idle:.0f} s so far)", metrics)

        if stabilized > current:
            step = step_size(behavior.max_scale_up_step, existing)
            desired = min(stabilized, max(current, existing + step))
            if desired == current:
                return Decision(current, f"{cause}; keeping {current} while only {existing} exist", metrics)
            limit = f" (maxScaleUpStep {behavior.max_scale_up_step})" if desired < stabilized else ""
            return self._decided(current, desired, now, metrics, f"{cause}: {current} -> {desired}{limit}")
        if stabilized < current:
            step = step_size(behavior.max_scale_down_step, existing)
            desired = max(stabilized, min(current, existing - step))
            if desired == current:
                return Decision(current, f"{cause}; keeping {current} while {existing} still exist", metrics)
            since_up = now - self._scaled_up_at if self._scaled_up_at is not None else math.inf
            if since_up < behavior.scale_down_delay_seconds:
                return Decision(current, f"{cause}; keeping {current}: no scale-down within "
                                         f"{behavior.scale_down_delay_seconds} s of the last scale-up "
                                         f"({behavior.scale_down_delay_seconds - since_up:.0f} s left)", metrics)
            limit = f" (maxScaleDownStep {behavior.max_scale_down_step})" if desired > stabilized else ""
            return self._decided(current, desired, now, metrics, f"{cause}: {current} -> {desired}{limit}")
        if recommended < current:
            return Decision(current, f"{cause}; keeping {current}: the last "
                                     f"{behavior.scale_down_stabilization_seconds} s asked for up to {down}", metrics)
        if recommended > current:
            return Decision(current, f"{cause}; keeping {current}: the last "
                                     f"{behavior.scale_up_stabilization_seconds} s asked for as few as {up}", metrics)
        return Decision(current, f"{cause}: keeping {current}", metrics)

    def _window(self, now: float) -> list[LoadSample]:
        """Samples to average, all with a replica serving; none when the latest sweep found none serving."""
        if not self._samples or self._samples[-1].ready_replicas == 0:
            return []
        recent = [s for s in self._samples if s.at > now - WINDOW_SECONDS]
        if len(recent) < MIN_WINDOW_SAMPLES:
            recent = list(self._samples)[-MIN_WINDOW_SAMPLES:]
        return [s for s in recent if s.ready_replicas > 0]

    def _ask(self, window: list[LoadSample], metrics: dict[str, float]) -> tuple[int, str]:
        """The replicas the busiest target asks for, and a sentence saying which and why."""
        if not any(_busy(s) for s in window):
            return 0, "no request running or waiting"
        asks = [(math.ceil(_mean([_total(t.metric, s) for s in window]) / t.value - _EPSILON), t)
                for t in self._spec.targets]
        ask, target = max(asks, key=lambda pair: pair[0])  # the first of equal asks, in the spec's order
        serving = _replicas(window[-1].ready_replicas)
        fullest = f" (the fullest of {serving} serving)" if target.metric == "kvCacheUsagePercent" else ""
        return ask, (f"{target.metric} {metrics[target.metric]:.1f}{fullest} asks for {_replicas(ask)} at "
                     f"{target.value:g} per replica")

    def _since(self, start: float) -> list[int]:
        return [replicas for at, replicas in self._recommendations if at > start]

    def _remember(self, now: float, replicas: int) -> None:
        behavior = self._spec.behavior
        longest = max(behavior.scale_up_stabilization_seconds, behavior.scale_down_stabilization_seconds)
        self._recommendations.append((now, replicas))
        while self._recommendations and self._recommendations[0][0] <= now - longest:
            self._recommendations.popleft()

    def _idle_for(self, now: float) -> float:
        """Seconds of unbroken watching with no request running or waiting."""
        if self._watched_since is None:
            return 0.0
        return now - max(self._watched_since, self._busy_at if self._busy_at is not None else -math.inf)

    def _decided(self, current: int, desired: int, now: float, metrics: dict[str, float], reason: str) -> Decision:
        if desired > current:
            self._scaled_up_at = now
        return Decision(desired, reason, metrics)
