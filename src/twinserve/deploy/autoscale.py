"""Autoscaling decisions: load samples of each variant in, "scale it to N" out.

Pure logic: no I/O, no threads, time from an injected clock. A controller samples the router
about once a second, feeds each variant's `LoadSample` to `Autoscaler.observe`, asks `decide`,
applies a decision it gets and then calls `scaled` (which starts cooldowns and clears the window).
A controller that restarts calls `restore` with the times of the last recorded scaling events, so
cooldowns outlive the process.

Window: the samples of a variant no older than `lookback_s` by the clock.

Metrics over the window (`metric_value`; the reported per-replica number):
- concurrent_requests_per_replica: each sample's in_flight / max(replicas, 1), plain mean over
  the samples (they come at a steady rate, so this is the time mean, as CloudWatch's Average of
  ConcurrentRequestsPerModel datapoints). Needs one sample.
- invocations_per_replica_per_minute: invocations in the window / the window's span in minutes /
  mean replicas. The span is newest − oldest sample time; the oldest sample only marks where the
  span starts (its invocations were sent before it), so this needs ≥ 2 samples at different times.

- backlog_per_replica (async endpoints): each sample's backlog (queued + running jobs) /
  max(replicas, 1), plain mean (SageMaker's ApproximateBacklogSizePerInstance). Needs one sample.

Load: the same quantity not divided by replicas (in-flight requests; invocations per minute).
desired = ceil(load / target), which is ceil(current × metric / target) while every current
replica is healthy. Load is measured directly so that replicas still starting (counted in
`current`, absent from the samples) are not counted twice, which would overshoot a scale-out.

Target tracking (SageMaker TargetTrackingScaling, Ray Serve `target_ongoing_requests`):
- scale-out: desired from the window's mean load > current → desired (≤ max_replicas), as soon
  as there is data, unless within `scale_out_cooldown_s` of the last scale-out.
- scale-in, conservative: only when the window is full (the variant has been observed for
  `lookback_s` since the start, the last scaling, or a gap longer than the window), not
  `disable_scale_in`, not within `scale_in_cooldown_s` of the last scaling either way, and
  desired from the window's *peak* load < current → that count (≥ min_replicas). The peak is
  the busiest sample for concurrency, the busiest whole minute for invocations (the whole window
  when shorter than two minutes). At n = ceil(peak / target), peak / n ≤ target: the load just
  seen cannot push the metric over the target at the new size, so a scale-in never flaps back.

Step scaling (SageMaker StepScaling behind a CloudWatch alarm):
- the window's mean metric → `policy.step_for(value)` (the interval holding value − threshold)
  → ChangeInCapacity: current + adj; PercentChangeInCapacity: current + adj % of current,
  rounded away from zero, at least `min_adjustment_magnitude` replicas when set; ExactCapacity:
  adj. Clamped to [min, max]; no step or no change → None.
- not within `cooldown_s` of the last scaling; a decision that removes replicas also needs a
  full window (as target tracking's scale-in), one that adds acts on the first data.

Wake from zero (SageMaker's HasBacklogWithoutCapacity step policy): a variant at 0 replicas
whose latest sample has a backlog goes to 1 at once, whatever the cooldowns or the window; it
does not start the scale-out cooldown, so target tracking adds more as soon as the first
replica serves. Scale-in to 0 (min_replicas 0) is an ordinary target-tracking scale-in: a full
window with no backlog at all, after the scale-in cooldown — that is the idle period.

Bounds: a current count outside [min_replicas, max_replicas] (e.g. 0 after replicas died) is
moved back into bounds first, whatever the cooldowns and with or without data.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twinserve.deploy.policies import (
    AutoscalingPolicy,
    StepAdjustment,
    StepScalingPolicy,
    TargetTrackingPolicy,
)
from twinserve.deploy.spec import ScalingEvent

CONCURRENCY = "concurrent_requests_per_replica"
INVOCATIONS = "invocations_per_replica_per_minute"
BACKLOG = "backlog_per_replica"
_LABELS = {
    CONCURRENCY: "concurrent requests per replica",
    INVOCATIONS: "invocations per replica per minute",
    BACKLOG: "backlog per replica",
}
# ceil(8.000000001) must stay 8: loads are sums and quotients of floats
_EPS = 1e-9
# busiest-minute buckets for the invocations peak: shorter ones are too noisy at 1 sample/s
_PEAK_BUCKET_S = 60.0


@dataclass(frozen=True)
class LoadSample:
    """What the router saw of one variant at one instant."""

    time: float  # monotonic seconds
    replicas: int  # replicas of the variant taking traffic (healthy) at that instant
    in_flight: int  # requests outstanding on them at that instant
    invocations: int  # requests the router sent to the variant since the previous sample
    backlog: int = 0  # async endpoints: jobs queued or running at that instant


@dataclass(frozen=True)
class ScalingDecision:
    """One "scale this variant from → to", with the numbers that led to it."""

    variant: str
    metric: str  # the policy's metric name
    metric_value: float | None  # per-replica value over the window; None: a bounds fix without data
    from_replicas: int
    to_replicas: int
    reason: str  # in words, with the metric, target/threshold, window and from → to

    @property
    def is_scale_out(self) -> bool:
        return self.to_replicas > self.from_replicas

    def to_event(self, endpoint: str) -> ScalingEvent:
        """The event `endpoint describe` lists (its time is now, UTC)."""
        return ScalingEvent(
            endpoint=endpoint,
            variant=self.variant,
            metric=self.metric,
            metric_value=self.metric_value,
            from_replicas=self.from_replicas,
            to_replicas=self.to_replicas,
            reason=self.reason,
        )


@dataclass
class _VariantState:
    samples: deque[LoadSample] = field(default_factory=deque)
    since: float | None = None  # first sample of the current window run (for "window full")
    last_scale_out: float | None = None
    last_scaling: float | None = None


@dataclass(frozen=True)
class _WindowStats:
    value: float  # per-replica metric (mean)
    load: float  # mean load the replicas must carry
    peak_load: float
    span: float  # seconds the samples cover
    count: int


class Autoscaler:
    """Per-variant windows, cooldowns and the policy's rules (see the module docstring)."""

    def __init__(
        self,
        policy: AutoscalingPolicy,
        variants: list[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not variants:
            raise ValueError("an autoscaler needs at least one variant")
        if policy.variant is not None and policy.variant not in variants:
            raise ValueError(f"policy variant {policy.variant!r} is not one of {variants}")
        self.policy = policy
        self.variants = list(variants)
        self._clock = clock
        self._state = {v: _VariantState() for v in variants}

    def scales(self, variant: str) -> bool:
        """Whether the policy scales this variant (all of them when `policy.variant` is None)."""
        self._get(variant)
        return self.policy.variant is None or self.policy.variant == variant

    def observe(self, variant: str, sample: LoadSample) -> None:
        """Add a sample; samples older than the window are dropped."""
        state = self._get(variant)
        if state.samples and sample.time < state.samples[-1].time:
            raise ValueError(f"sample at {sample.time} is older than the last one ({state.samples[-1].time})")
        self._trim(state, max(self._clock(), sample.time))
        if not state.samples:
            state.since = sample.time  # a new run of samples: the window fills from here
        state.samples.append(sample)

    def metric_value(self, variant: str) -> float | None:
        """The policy's per-replica metric over the window; None without enough samples."""
        stats = self._stats(variant)
        return None if stats is None else stats.value

    def decide(self, variant: str, current_replicas: int) -> ScalingDecision | None:
        """What to scale `variant` to now, given its desired count; None = stay."""
        if not self.scales(variant):
            return None
        policy = self.policy
        if current_replicas < policy.min_replicas or current_replicas > policy.max_replicas:
            return self._into_bounds(variant, current_replicas)
        if current_replicas == 0:
            return self._wake(variant)
        stats = self._stats(variant)
        if stats is None:
            return None
        if isinstance(policy, TargetTrackingPolicy):
            return self._target_tracking(policy, variant, current_replicas, stats)
        return self._step_scaling(policy, variant, current_replicas, stats)

    def scaled(self, variant: str, decision: ScalingDecision) -> None:
        """The controller applied `decision`: start cooldowns, start a new window.

        Samples taken at the old size no longer describe the new one, so they are dropped.
        """
        state = self._get(variant)
        now = self._clock()
        if decision.is_scale_out and decision.from_replicas > 0:  # a wake from 0 starts no cooldown
            state.last_scale_out = now
        state.last_scaling = now
        state.samples.clear()
        state.since = None

    def restore(self, variant: str, *, last_scaling: float | None, last_scale_out: float | None) -> None:
        """Resume cooldowns from an earlier process (times on this clock; None: never scaled).

        The window starts empty: its samples were not kept, and a scale-in waits for a full one."""
        state = self._get(variant)
        state.last_scaling, state.last_scale_out = last_scaling, last_scale_out

    # --- rules ---

    def _target_tracking(
        self, policy: TargetTrackingPolicy, variant: str, current: int, stats: _WindowStats
    ) -> ScalingDecision | None:
        state, now = self._state[variant], self._clock()
        label, window = _LABELS[policy.metric], _window_words(stats)
        desired = self._clamp(_ceil(stats.load / policy.target))
        if desired > current:
            if _within(state.last_scale_out, policy.scale_out_cooldown_s, now):
                return None
            reason = f"{label} {stats.value:.2f} > target {policy.target:g} {window}: {current} → {desired}"
            return self._decision(variant, stats.value, current, desired, reason)
        if policy.disable_scale_in or not self._full(state, policy.lookback_s, now):
            return None
        if _within(state.last_scaling, policy.scale_in_cooldown_s, now):
            return None
        smaller = self._clamp(_ceil(stats.peak_load / policy.target))
        if smaller >= current:
            return None
        peak = stats.peak_load / max(current, 1)
        reason = (
            f"{label} {stats.value:.2f} (peak {peak:.2f}) < target {policy.target:g} {window}; "
            f"the peak fits {smaller}: {current} → {smaller}"
        )
        return self._decision(variant, stats.value, current, smaller, reason)

    def _step_scaling(
        self, policy: StepScalingPolicy, variant: str, current: int, stats: _WindowStats
    ) -> ScalingDecision | None:
        state, now = self._state[variant], self._clock()
        if _within(state.last_scaling, policy.cooldown_s, now):
            return None
        step = policy.step_for(stats.value)
        if step is None:
            return None
        new = self._clamp(_apply_step(policy, step, current))
        if new == current or (new < current and not self._full(state, policy.lookback_s, now)):
            return None
        delta = stats.value - policy.threshold
        reason = (
            f"{_LABELS[policy.metric]} {stats.value:.2f} is {delta:+.2f} from threshold "
            f"{policy.threshold:g} {_window_words(stats)}; step {_interval_words(step)} → "
            f"{policy.adjustment_type} {step.scaling_adjustment:+d}: {current} → {new}"
        )
        return self._decision(variant, stats.value, current, new, reason)

    def _wake(self, variant: str) -> ScalingDecision | None:
        samples = self._get(variant).samples
        backlog = samples[-1].backlog if samples else 0
        if backlog <= 0 or self.policy.max_replicas < 1:
            return None
        reason = f"{backlog} job(s) waiting with no replica (HasBacklogWithoutCapacity): 0 → 1"
        return self._decision(variant, float(backlog), 0, 1, reason)

    def _into_bounds(self, variant: str, current: int) -> ScalingDecision:
        lo, hi = self.policy.min_replicas, self.policy.max_replicas
        if current < lo:
            reason = f"{current} replicas below min_replicas {lo}: {current} → {lo}"
            return self._decision(variant, self.metric_value(variant), current, lo, reason)
        reason = f"{current} replicas above max_replicas {hi}: {current} → {hi}"
        return self._decision(variant, self.metric_value(variant), current, hi, reason)

    # --- window ---

    def _stats(self, variant: str) -> _WindowStats | None:
        state = self._get(variant)
        self._trim(state, self._clock())
        samples = list(state.samples)
        if self.policy.metric == CONCURRENCY:
            return _instant_stats(samples, lambda s: s.in_flight)
        if self.policy.metric == BACKLOG:
            return _instant_stats(samples, lambda s: s.backlog)
        return _invocation_stats(samples)

    def _trim(self, state: _VariantState, now: float) -> None:
        cutoff = now - self.policy.lookback_s
        while state.samples and state.samples[0].time < cutoff:
            state.samples.popleft()
        if not state.samples:
            state.since = None

    @staticmethod
    def _full(state: _VariantState, lookback_s: float, now: float) -> bool:
        return state.since is not None and now - state.since >= lookback_s - _EPS

    def _clamp(self, n: int) -> int:
        return max(self.policy.min_replicas, min(self.policy.max_replicas, n))

    def _decision(
        self, variant: str, value: float | None, current: int, new: int, reason: str
    ) -> ScalingDecision:
        return ScalingDecision(
            variant=variant,
            metric=self.policy.metric,
            metric_value=value,
            from_replicas=current,
            to_replicas=new,
            reason=reason,
        )

    def _get(self, variant: str) -> _VariantState:
        try:
            return self._state[variant]
        except KeyError:
            raise KeyError(f"unknown variant {variant!r}; the autoscaler has {self.variants}") from None


def _instant_stats(
    samples: Sequence[LoadSample], load_of: Callable[[LoadSample], int]
) -> _WindowStats | None:
    """Stats of a load read at each instant (in-flight requests, the backlog): its plain mean per
    replica, its mean, its peak. Needs one sample."""
    if not samples:
        return None
    n = len(samples)
    loads = [load_of(s) for s in samples]
    return _WindowStats(
        value=sum(load / max(s.replicas, 1) for load, s in zip(loads, samples, strict=True)) / n,
        load=sum(loads) / n,
        peak_load=float(max(loads)),
        span=samples[-1].time - samples[0].time,
        count=n,
    )


def _invocation_stats(samples: Sequence[LoadSample]) -> _WindowStats | None:
    if len(samples) < 2 or samples[-1].time <= samples[0].time:
        return None
    counted = samples[1:]  # the first sample's invocations were sent before the span starts
    span = samples[-1].time - samples[0].time
    per_minute = sum(s.invocations for s in counted) / span * 60.0
    mean_replicas = sum(max(s.replicas, 1) for s in counted) / len(counted)
    return _WindowStats(
        value=per_minute / mean_replicas,
        load=per_minute,
        peak_load=_busiest_minute(samples, per_minute),
        span=span,
        count=len(samples),
    )


def _busiest_minute(samples: Sequence[LoadSample], mean_per_minute: float) -> float:
    """Invocations per minute in the busiest bucket of ≥ 60 s (a shorter tail joins the last one)."""
    buckets: list[tuple[float, int]] = []  # (seconds, invocations)
    start, count = samples[0].time, 0
    for s in samples[1:]:
        count += s.invocations
        if s.time - start >= _PEAK_BUCKET_S:
            buckets.append((s.time - start, count))
            start, count = s.time, 0
    if not buckets:
        return mean_per_minute
    if samples[-1].time > start:
        seconds, n = buckets.pop()
        buckets.append((seconds + samples[-1].time - start, n + count))
    return max(mean_per_minute, *(n / seconds * 60.0 for seconds, n in buckets))


def _apply_step(policy: StepScalingPolicy, step: StepAdjustment, current: int) -> int:
    adj = step.scaling_adjustment
    if policy.adjustment_type == "ChangeInCapacity":
        return current + adj
    if policy.adjustment_type == "ExactCapacity":
        return adj
    change = current * adj / 100.0
    magnitude = _ceil(abs(change))  # away from zero: a small percent still moves
    if magnitude and policy.min_adjustment_magnitude is not None:
        magnitude = max(magnitude, policy.min_adjustment_magnitude)
    return current + int(math.copysign(magnitude, change))


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def _within(since: float | None, cooldown_s: float, now: float) -> bool:
    return since is not None and now - since < cooldown_s


def _window_words(stats: _WindowStats) -> str:
    if stats.count == 1:
        return "over 1 sample"
    return f"over {stats.span:.0f} s ({stats.count} samples)"


def _interval_words(step: StepAdjustment) -> str:
    lo, hi = step.metric_interval_lower_bound, step.metric_interval_upper_bound
    return f"[{'-∞' if lo is None else f'{lo:+g}'}, {'+∞' if hi is None else f'{hi:+g}'})"
