"""Autoscaling decisions on a fake clock: target tracking, step scaling, cooldowns, windows, bounds."""

from __future__ import annotations

from typing import Any

import pytest

from twinserve.deploy.autoscale import Autoscaler, LoadSample, ScalingDecision
from twinserve.deploy.policies import AutoscalingPolicy, StepScalingPolicy, TargetTrackingPolicy


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def tracking(**kw: Any) -> TargetTrackingPolicy:
    base: dict[str, Any] = {"target": 4, "max_replicas": 8, "lookback_s": 10}
    return TargetTrackingPolicy.model_validate({**base, **kw})


def stepping(steps: list[dict[str, Any]], **kw: Any) -> StepScalingPolicy:
    base: dict[str, Any] = {"threshold": 5, "max_replicas": 10, "lookback_s": 10, "cooldown_s": 30}
    return StepScalingPolicy.model_validate({**base, "step_adjustments": steps, **kw})


def scaler(policy: AutoscalingPolicy, variants: list[str] | None = None) -> tuple[Autoscaler, FakeClock]:
    clock = FakeClock()
    return Autoscaler(policy, variants or ["primary"], clock=clock), clock


def feed(
    a: Autoscaler,
    clock: FakeClock,
    seconds: int,
    *,
    replicas: int,
    in_flight: int | list[int] = 0,
    invocations: int = 0,
    variant: str = "primary",
) -> None:
    """`seconds` samples, one a second, each after advancing the clock by 1 s (in_flight cycles)."""
    loads = in_flight if isinstance(in_flight, list) else [in_flight]
    for i in range(seconds):
        clock.t += 1.0
        sample = LoadSample(clock.t, replicas, loads[i % len(loads)], invocations)
        a.observe(variant, sample)


def apply(a: Autoscaler, d: ScalingDecision | None) -> ScalingDecision:
    assert d is not None
    a.scaled(d.variant, d)
    return d


# --- target tracking: concurrency ---


def test_burst_scales_out_on_the_first_sample() -> None:
    a, clock = scaler(tracking())
    feed(a, clock, 1, replicas=1, in_flight=8)
    d = a.decide("primary", 1)
    assert d is not None and (d.from_replicas, d.to_replicas) == (1, 2)
    assert d.metric == "concurrent_requests_per_replica" and d.metric_value == 8.0
    assert "8.00 > target 4" in d.reason and "1 → 2" in d.reason


def test_scale_out_goes_straight_to_the_count_the_load_needs_within_max() -> None:
    a, clock = scaler(tracking())
    feed(a, clock, 3, replicas=2, in_flight=[20, 22, 24])  # mean 22 → ceil(22 / 4) = 6
    d = a.decide("primary", 2)
    assert d is not None and d.to_replicas == 6 and d.metric_value == pytest.approx(11.0)
    feed(a, clock, 1, replicas=2, in_flight=400)
    d = a.decide("primary", 2)
    assert d is not None and d.to_replicas == 8  # max_replicas


def test_scale_out_cooldown() -> None:
    a, clock = scaler(tracking(scale_out_cooldown_s=60))
    feed(a, clock, 1, replicas=1, in_flight=8)
    apply(a, a.decide("primary", 1))
    assert a.metric_value("primary") is None  # the window starts again at the new size
    feed(a, clock, 30, replicas=2, in_flight=24)
    assert a.decide("primary", 2) is None  # 30 s after the scale-out
    clock.t += 30
    feed(a, clock, 1, replicas=2, in_flight=24)
    d = a.decide("primary", 2)
    assert d is not None and d.to_replicas == 6


def test_restored_cooldowns_hold_as_if_the_process_had_never_restarted() -> None:
    a, clock = scaler(tracking(scale_out_cooldown_s=60, scale_in_cooldown_s=300))
    # a new process: the last scaling (a scale-out) was 30 s ago by the recorded events
    a.restore("primary", last_scaling=clock.t - 30, last_scale_out=clock.t - 30)
    feed(a, clock, 1, replicas=2, in_flight=24)
    assert a.decide("primary", 2) is None  # still within the scale-out cooldown
    clock.t += 30
    feed(a, clock, 1, replicas=2, in_flight=24)
    d = a.decide("primary", 2)
    assert d is not None and d.to_replicas == 6
    # scale-in: the restored last scaling holds it back for its cooldown, full window or not
    b, clock = scaler(tracking(scale_in_cooldown_s=300))
    b.restore("primary", last_scaling=clock.t - 100, last_scale_out=None)
    feed(b, clock, 20, replicas=4, in_flight=0)
    assert b.decide("primary", 4) is None  # 120 s since the last scaling < 300
    clock.t += 180
    feed(b, clock, 20, replicas=4, in_flight=0)
    d = b.decide("primary", 4)
    assert d is not None and d.to_replicas == 1


def test_replicas_still_starting_are_not_counted_twice() -> None:
    """current counts a replica that is not healthy yet: the load, not metric x current, decides."""
    a, clock = scaler(tracking(scale_out_cooldown_s=0))
    feed(a, clock, 1, replicas=1, in_flight=8)
    apply(a, a.decide("primary", 1))  # → 2; the second replica is loading
    feed(a, clock, 5, replicas=1, in_flight=8)  # per replica 8, but 8 requests fit 2 replicas
    assert a.metric_value("primary") == 8.0
    assert a.decide("primary", 2) is None


def test_scale_in_waits_for_a_full_window() -> None:
    a, clock = scaler(tracking(lookback_s=10))
    feed(a, clock, 6, replicas=4, in_flight=2)  # 5 s covered
    assert a.decide("primary", 4) is None
    feed(a, clock, 5, replicas=4, in_flight=2)  # now 10 s
    d = a.decide("primary", 4)
    assert d is not None and (d.from_replicas, d.to_replicas) == (4, 1)
    assert "peak" in d.reason and "< target 4" in d.reason and "4 → 1" in d.reason


def test_scale_in_cooldown_counts_from_any_scaling() -> None:
    a, clock = scaler(tracking(scale_in_cooldown_s=300, scale_out_cooldown_s=60))
    feed(a, clock, 1, replicas=1, in_flight=16)
    apply(a, a.decide("primary", 1))  # → 4 at t0
    feed(a, clock, 298, replicas=4, in_flight=5)  # window long full, 5 requests fit 2 replicas
    assert a.decide("primary", 4) is None
    feed(a, clock, 1, replicas=4, in_flight=5)  # t0 + 299
    assert a.decide("primary", 4) is None
    feed(a, clock, 1, replicas=4, in_flight=5)  # t0 + 300
    d = apply(a, a.decide("primary", 4))
    assert d.to_replicas == 2
    # a scale-in starts the scale-in cooldown ...
    feed(a, clock, 20, replicas=2, in_flight=1)
    assert a.decide("primary", 2) is None
    # ... but not the scale-out one: a burst 21 s after it scales out at once
    feed(a, clock, 1, replicas=2, in_flight=100)  # window mean (10 x 1 + 100) / 11 = 10 → 3
    d = a.decide("primary", 2)
    assert d is not None and d.to_replicas == 3


def test_scale_out_cooldown_does_not_hold_a_scale_in_back() -> None:
    a, clock = scaler(tracking(scale_in_cooldown_s=5, scale_out_cooldown_s=600))
    feed(a, clock, 1, replicas=1, in_flight=12)
    apply(a, a.decide("primary", 1))  # → 3
    clock.t += 1
    feed(a, clock, 11, replicas=3, in_flight=1)
    d = a.decide("primary", 3)
    assert d is not None and d.to_replicas == 1


def test_peak_rule_prevents_flapping() -> None:
    """Load rising within the window: its mean fits 2 replicas, its peak needs 3.

    Scaling in on the mean (to 2) would scale out again as soon as the window holds only the
    peak load; scaling in on the peak (to 3) leaves a count that load does not push out of.
    """
    a, clock = scaler(tracking(scale_in_cooldown_s=0, scale_out_cooldown_s=0))
    feed(a, clock, 6, replicas=4, in_flight=2)
    feed(a, clock, 5, replicas=4, in_flight=10)
    assert a.metric_value("primary") == pytest.approx(62 / 11 / 4)  # load 5.6 → ceil(5.6 / 4) = 2
    d = apply(a, a.decide("primary", 4))
    assert (d.from_replicas, d.to_replicas) == (4, 3)
    # the peak load stays: 3 replicas carry it, no scale-out, no further scale-in
    feed(a, clock, 11, replicas=3, in_flight=10)
    assert a.decide("primary", 3) is None
    # where the mean would have led: at 2 replicas the same load is over the target
    b, clock_b = scaler(tracking(scale_in_cooldown_s=0, scale_out_cooldown_s=0))
    feed(b, clock_b, 11, replicas=2, in_flight=10)
    d = b.decide("primary", 2)
    assert d is not None and d.to_replicas == 3


def test_disable_scale_in_only_ever_adds() -> None:
    a, clock = scaler(tracking(disable_scale_in=True))
    feed(a, clock, 30, replicas=4, in_flight=0)
    assert a.decide("primary", 4) is None
    clock.t += 20  # the quiet samples leave the window
    feed(a, clock, 1, replicas=4, in_flight=40)
    d = a.decide("primary", 4)
    assert d is not None and d.to_replicas == 8  # ceil(40 / 4) = 10, clamped to max_replicas


def test_scale_in_stops_at_min_replicas() -> None:
    a, clock = scaler(tracking(min_replicas=2))
    feed(a, clock, 11, replicas=4, in_flight=0)
    d = a.decide("primary", 4)
    assert d is not None and d.to_replicas == 2


def test_out_of_bounds_counts_are_clamped_without_data_or_cooldown() -> None:
    a, clock = scaler(tracking(min_replicas=1, max_replicas=3))
    d = apply(a, a.decide("primary", 0))  # every replica died
    assert (d.from_replicas, d.to_replicas, d.metric_value) == (0, 1, None)
    assert "below min_replicas" in d.reason
    d = a.decide("primary", 5)  # right after a scaling: cooldowns don't apply
    assert d is not None and d.to_replicas == 3 and "above max_replicas" in d.reason


def test_window_drops_old_samples() -> None:
    a, clock = scaler(tracking(lookback_s=10))
    feed(a, clock, 5, replicas=1, in_flight=40)
    clock.t += 1
    feed(a, clock, 11, replicas=1, in_flight=2)
    assert a.metric_value("primary") == 2.0
    clock.t += 100  # no samples for longer than the window
    assert a.metric_value("primary") is None
    assert a.decide("primary", 1) is None


def test_a_gap_in_samples_restarts_the_full_window() -> None:
    a, clock = scaler(tracking(lookback_s=10))
    feed(a, clock, 11, replicas=4, in_flight=0)
    clock.t += 60
    feed(a, clock, 3, replicas=4, in_flight=0)
    assert a.decide("primary", 4) is None  # 2 s of data after the gap


# --- target tracking: invocations per replica per minute ---


def test_invocations_per_replica_per_minute() -> None:
    a, clock = scaler(tracking(metric="invocations_per_replica_per_minute", target=60, lookback_s=60))
    feed(a, clock, 1, replicas=2, invocations=3)
    assert a.metric_value("primary") is None  # one sample covers no time
    feed(a, clock, 10, replicas=2, invocations=3)
    # 11 samples span 10 s; the first one's 3 were sent before: 30 per 1/6 min = 180/min, 90 each
    assert a.metric_value("primary") == pytest.approx(90.0)
    d = a.decide("primary", 2)
    assert d is not None and d.to_replicas == 3  # ceil(180 / 60)
    assert "invocations per replica per minute 90.00 > target 60" in d.reason


def test_invocations_scale_in_reads_the_busiest_minute() -> None:
    a, clock = scaler(
        tracking(metric="invocations_per_replica_per_minute", target=60, lookback_s=180, max_replicas=8)
    )
    feed(a, clock, 1, replicas=4)  # marks the start
    feed(a, clock, 60, replicas=4, invocations=2)  # 120 / min in the first minute
    feed(a, clock, 120, replicas=4, invocations=0)
    assert a.metric_value("primary") == pytest.approx(120 / 3 / 4)  # 120 invocations in 3 min, 4 replicas
    d = a.decide("primary", 4)
    assert d is not None and d.to_replicas == 2  # the busiest minute (120/min) needs 2, the mean 1


# --- step scaling ---

STEPS = [
    {"metric_interval_upper_bound": -3, "scaling_adjustment": -1},
    {"metric_interval_lower_bound": 0, "metric_interval_upper_bound": 5, "scaling_adjustment": 1},
    {"metric_interval_lower_bound": 5, "scaling_adjustment": 3},
]


@pytest.mark.parametrize(
    ("load", "expected"),
    [(5, 3), (9, 3), (10, 5), (12, 5), (4, None), (2, None)],
)
def test_step_chosen_by_distance_to_threshold(load: int, expected: int | None) -> None:
    """threshold 5: [0, 5) → +1, [5, ∞) → +3, (-∞, -3) → -1; lower bounds inclusive, [-3, 0) a gap."""
    a, clock = scaler(stepping(STEPS))
    feed(a, clock, 1, replicas=2, in_flight=load * 2)
    assert a.metric_value("primary") == load
    d = a.decide("primary", 2)
    assert (d.to_replicas if d else None) == expected


def test_step_scale_in_needs_a_full_window_and_respects_cooldown() -> None:
    a, clock = scaler(stepping(STEPS, cooldown_s=30))
    feed(a, clock, 5, replicas=3, in_flight=3)  # 1 per replica: delta -4 → -1
    assert a.decide("primary", 3) is None
    feed(a, clock, 6, replicas=3, in_flight=3)
    d = apply(a, a.decide("primary", 3))
    assert d.to_replicas == 2 and "-4.00 from threshold 5" in d.reason and "ChangeInCapacity -1" in d.reason
    feed(a, clock, 1, replicas=2, in_flight=40)
    assert a.decide("primary", 2) is None  # cooldown after any scaling
    clock.t += 30
    feed(a, clock, 1, replicas=2, in_flight=40)
    d = a.decide("primary", 2)
    assert d is not None and d.to_replicas == 5


@pytest.mark.parametrize(
    ("adjustment", "current", "expected"),
    [(50, 3, 5), (-50, 3, 1), (10, 4, 5), (100, 6, 10), (-10, 1, 1)],
)
def test_percent_change_rounds_away_from_zero(adjustment: int, current: int, expected: int) -> None:
    steps = [{"metric_interval_lower_bound": None, "scaling_adjustment": adjustment}]
    a, clock = scaler(stepping(steps, adjustment_type="PercentChangeInCapacity", lookback_s=1))
    feed(a, clock, 2, replicas=current, in_flight=0)
    d = a.decide("primary", current)
    assert (d.to_replicas if d else current) == expected


def test_min_adjustment_magnitude() -> None:
    steps = [{"scaling_adjustment": 10}]
    policy = stepping(steps, adjustment_type="PercentChangeInCapacity", min_adjustment_magnitude=3)
    a, clock = scaler(policy)
    feed(a, clock, 1, replicas=4, in_flight=0)
    d = a.decide("primary", 4)
    assert d is not None and d.to_replicas == 7  # 10 % of 4 = 0.4 → 1 → at least 3


def test_exact_capacity_is_clamped() -> None:
    steps = [
        {"metric_interval_upper_bound": 0, "scaling_adjustment": 2},
        {"metric_interval_lower_bound": 0, "scaling_adjustment": 50},
    ]
    a, clock = scaler(stepping(steps, adjustment_type="ExactCapacity", max_replicas=6))
    feed(a, clock, 1, replicas=3, in_flight=30)
    d = apply(a, a.decide("primary", 3))
    assert d.to_replicas == 6
    clock.t += 31
    feed(a, clock, 11, replicas=6, in_flight=0)
    d = a.decide("primary", 6)
    assert d is not None and d.to_replicas == 2 and "ExactCapacity +2" in d.reason


# --- variants and events ---


def test_policy_variant_restricts_scaling() -> None:
    a, clock = scaler(tracking(variant="blue"), ["blue", "green"])
    feed(a, clock, 1, replicas=1, in_flight=40, variant="green")
    feed(a, clock, 1, replicas=1, in_flight=40, variant="blue")
    assert a.decide("green", 1) is None
    assert a.decide("green", 0) is None  # not even bounds
    d = a.decide("blue", 1)
    assert d is not None and d.variant == "blue"


def test_each_variant_scales_on_its_own() -> None:
    a, clock = scaler(tracking(), ["blue", "green"])
    feed(a, clock, 1, replicas=1, in_flight=8, variant="blue")
    feed(a, clock, 1, replicas=1, in_flight=8, variant="green")
    apply(a, a.decide("blue", 1))
    assert a.metric_value("green") == 8.0  # blue's window and cooldown are blue's
    d = a.decide("green", 1)
    assert d is not None and d.variant == "green"


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="not one of"):
        Autoscaler(tracking(variant="red"), ["blue"])
    a, clock = scaler(tracking())
    with pytest.raises(KeyError, match="unknown variant"):
        a.decide("red", 1)
    feed(a, clock, 1, replicas=1)
    with pytest.raises(ValueError, match="older"):
        a.observe("primary", LoadSample(clock.t - 5, 1, 0, 0))


def test_to_event() -> None:
    a, clock = scaler(tracking())
    feed(a, clock, 1, replicas=1, in_flight=6)
    d = a.decide("primary", 1)
    assert d is not None
    event = d.to_event("twin")
    assert event.endpoint == "twin" and event.variant == "primary"
    assert event.metric == "concurrent_requests_per_replica" and event.metric_value == 6.0
    assert (event.from_replicas, event.to_replicas) == (1, 2) and event.reason == d.reason
    assert event.time.tzinfo is not None


# --- async endpoints: backlog per replica, scale to zero, wake from zero ---


def backlog_feed(a: Autoscaler, clock: FakeClock, seconds: int, *, replicas: int, backlog: int) -> None:
    for _ in range(seconds):
        clock.t += 1.0
        a.observe("primary", LoadSample(clock.t, replicas, 0, 0, backlog=backlog))


def test_backlog_target_tracking_scales_out_on_jobs_per_replica() -> None:
    a, clock = scaler(tracking(metric="backlog_per_replica", target=5, min_replicas=0, max_replicas=4))
    backlog_feed(a, clock, 3, replicas=1, backlog=18)
    d = apply(a, a.decide("primary", 1))
    assert (d.from_replicas, d.to_replicas) == (1, 4)  # ceil(18 / 5) = 4
    assert d.metric == "backlog_per_replica" and d.metric_value == pytest.approx(18.0)
    assert "backlog per replica 18.00 > target 5" in d.reason


def test_idle_backlog_scales_in_to_zero_only_after_a_full_quiet_window_and_cooldown() -> None:
    a, clock = scaler(
        tracking(
            metric="backlog_per_replica", target=5, min_replicas=0, max_replicas=2, scale_in_cooldown_s=30
        )
    )
    backlog_feed(a, clock, 9, replicas=1, backlog=0)
    assert a.decide("primary", 1) is None  # the window (10 s) is not full yet
    backlog_feed(a, clock, 5, replicas=1, backlog=0)
    d = apply(a, a.decide("primary", 1))
    assert (d.from_replicas, d.to_replicas) == (1, 0)
    # one job in the window keeps the replica: the peak must fit in zero replicas, and only 0 does
    a2, clock2 = scaler(tracking(metric="backlog_per_replica", target=5, min_replicas=0, max_replicas=2))
    backlog_feed(a2, clock2, 8, replicas=1, backlog=0)
    backlog_feed(a2, clock2, 1, replicas=1, backlog=1)
    backlog_feed(a2, clock2, 8, replicas=1, backlog=0)
    assert a2.decide("primary", 1) is None


def test_a_job_wakes_a_variant_at_zero_at_once_whatever_the_cooldowns() -> None:
    a, clock = scaler(
        tracking(
            metric="backlog_per_replica", target=5, min_replicas=0, max_replicas=3, scale_out_cooldown_s=600
        )
    )
    backlog_feed(a, clock, 14, replicas=1, backlog=0)
    apply(a, a.decide("primary", 1))  # 1 → 0
    backlog_feed(a, clock, 3, replicas=0, backlog=0)
    assert a.decide("primary", 0) is None  # nothing waiting: stay at zero
    backlog_feed(a, clock, 1, replicas=0, backlog=12)
    wake = apply(a, a.decide("primary", 0))
    assert (wake.from_replicas, wake.to_replicas) == (0, 1)
    assert "HasBacklogWithoutCapacity" in wake.reason
    # the wake starts no scale-out cooldown: once the first replica serves, target tracking adds more
    backlog_feed(a, clock, 1, replicas=1, backlog=12)
    more = a.decide("primary", 1)
    assert more is not None and (more.from_replicas, more.to_replicas) == (1, 3)


def test_wake_needs_the_latest_sample_to_have_a_backlog() -> None:
    a, clock = scaler(tracking(metric="backlog_per_replica", target=5, min_replicas=0, max_replicas=3))
    backlog_feed(a, clock, 1, replicas=0, backlog=4)
    backlog_feed(a, clock, 1, replicas=0, backlog=0)  # a job came and expired/was purged
    assert a.decide("primary", 0) is None
