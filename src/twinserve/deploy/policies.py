"""Autoscaling policies of an endpoint (`autoscaling:` in the YAML): target tracking and step scaling.

The concepts and names follow SageMaker's Application Auto Scaling, so the same policy is run by
the local controller (`deploy/autoscale.py`) and applied for real on SageMaker.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ScalingMetric = Literal[
    "concurrent_requests_per_replica", "invocations_per_replica_per_minute", "backlog_per_replica"
]


class TargetTrackingPolicy(BaseModel):
    """Keep a per-replica metric near `target` (SageMaker target tracking, Ray Serve target_ongoing_requests)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["target_tracking"] = Field("target_tracking", description="Discriminator.")
    variant: str | None = Field(None, description="Variant it scales; None = each variant on its own.")
    metric: ScalingMetric = Field(
        "concurrent_requests_per_replica",
        description=(
            "concurrent_requests_per_replica (SageMaker ConcurrentRequestsPerModel), "
            "invocations_per_replica_per_minute (SageMakerVariantInvocationsPerInstance) or, "
            "for async endpoints, backlog_per_replica (ApproximateBacklogSizePerInstance: "
            "queued + running jobs per replica)."
        ),
    )
    target: float = Field(gt=0, description="Desired metric value per replica.")
    min_replicas: int = Field(1, ge=0, description="Lower bound; 0 only for endpoints with a queue (async).")
    max_replicas: int = Field(ge=1, le=64, description="Upper bound; >= min_replicas.")
    scale_out_cooldown_s: float = Field(60.0, ge=0, description="Wait after a scale-out before the next one.")
    scale_in_cooldown_s: float = Field(300.0, ge=0, description="Wait after any scaling before a scale-in.")
    lookback_s: float = Field(60.0, gt=0, description="Window the metric is averaged over.")
    disable_scale_in: bool = Field(False, description="Only ever add replicas (scale in by hand).")

    @model_validator(mode="after")
    def _bounds(self) -> TargetTrackingPolicy:
        _check_bounds(self.min_replicas, self.max_replicas)
        return self


class StepAdjustment(BaseModel):
    """One step: when `metric - threshold` lies in [lower, upper), change capacity by `scaling_adjustment`."""

    model_config = ConfigDict(extra="forbid")

    metric_interval_lower_bound: float | None = Field(
        None, description="Inclusive, relative to the threshold; None = minus infinity."
    )
    metric_interval_upper_bound: float | None = Field(
        None, description="Exclusive, relative to the threshold; None = plus infinity."
    )
    scaling_adjustment: int = Field(
        description="Replicas to add (negative: remove), a percent, or the exact count (by adjustment_type)."
    )

    @model_validator(mode="after")
    def _interval(self) -> StepAdjustment:
        lo, hi = self.metric_interval_lower_bound, self.metric_interval_upper_bound
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"step interval is empty: lower bound {lo} >= upper bound {hi}")
        return self


class StepScalingPolicy(BaseModel):
    """Scale by steps of a metric's distance to a threshold (SageMaker StepScalingPolicyConfiguration)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["step_scaling"] = Field("step_scaling", description="Discriminator.")
    variant: str | None = Field(None, description="Variant it scales; None = each variant on its own.")
    metric: ScalingMetric = Field("concurrent_requests_per_replica", description="See TargetTrackingPolicy.")
    threshold: float = Field(description="Alarm threshold the step bounds are relative to.")
    adjustment_type: Literal["ChangeInCapacity", "PercentChangeInCapacity", "ExactCapacity"] = Field(
        "ChangeInCapacity", description="How scaling_adjustment is read (SageMaker's names)."
    )
    step_adjustments: list[StepAdjustment] = Field(
        min_length=1, description="Non-overlapping intervals; at most one open below and one open above."
    )
    min_adjustment_magnitude: int | None = Field(
        None, ge=1, description="Least replicas a PercentChangeInCapacity step changes."
    )
    cooldown_s: float = Field(60.0, ge=0, description="Wait after a scaling activity before the next one.")
    lookback_s: float = Field(60.0, gt=0, description="Window the metric is averaged over.")
    min_replicas: int = Field(1, ge=0, description="Lower bound; 0 only for endpoints with a queue (async).")
    max_replicas: int = Field(ge=1, le=64, description="Upper bound; >= min_replicas.")

    @model_validator(mode="after")
    def _steps(self) -> StepScalingPolicy:
        _check_bounds(self.min_replicas, self.max_replicas)
        inf = float("inf")
        spans = sorted(
            (
                -inf if s.metric_interval_lower_bound is None else s.metric_interval_lower_bound,
                inf if s.metric_interval_upper_bound is None else s.metric_interval_upper_bound,
            )
            for s in self.step_adjustments
        )
        for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False):
            if lo < hi:
                raise ValueError(f"step intervals overlap around {lo:g} (relative to the threshold)")
        if self.min_adjustment_magnitude is not None and self.adjustment_type != "PercentChangeInCapacity":
            raise ValueError("min_adjustment_magnitude applies only to PercentChangeInCapacity")
        return self

    def step_for(self, metric_value: float) -> StepAdjustment | None:
        """The step whose interval holds `metric_value - threshold`, if any."""
        delta = metric_value - self.threshold
        for step in self.step_adjustments:
            lo, hi = step.metric_interval_lower_bound, step.metric_interval_upper_bound
            if (lo is None or delta >= lo) and (hi is None or delta < hi):
                return step
        return None


def _check_bounds(lo: int, hi: int) -> None:
    if hi < lo:
        raise ValueError(f"max_replicas ({hi}) must be >= min_replicas ({lo})")


AutoscalingPolicy = Annotated[TargetTrackingPolicy | StepScalingPolicy, Field(discriminator="type")]
