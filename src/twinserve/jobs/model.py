"""What the async job queue stores: a `Job` (one asynchronous inference request and its
progress), its `JobStatus`, and the `Lease` a worker holds while it runs one.

The fields follow SageMaker Asynchronous Inference where it has a name for them
(`InferenceId`, `RequestTTLSeconds`, `InvocationTimeoutSeconds`, `OutputLocation`,
`FailureLocation`), so the local gateway can answer in its terms without a mapping table.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

# SageMaker's limit for a request payload sent inline to an async endpoint; larger inputs
# go by location (InputLocation), which the queue stores without reading.
MAX_INLINE_BODY_BYTES = 6 * 1024 * 1024
# Six hours: SageMaker's default (and maximum) RequestTTLSeconds.
DEFAULT_TTL_S = 6 * 3600.0
# Fifteen minutes: SageMaker's default InvocationTimeoutSeconds for async endpoints.
DEFAULT_INVOCATION_TIMEOUT_S = 900.0
_INPUT_SCHEMES = ("file://", "s3://")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_inference_id() -> str:
    return uuid.uuid4().hex


class JobStatus(StrEnum):
    """Where a job is: waiting (`queued`), held by a worker (`running`), or done for good."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        """No transition leaves a final status: its result (or failure) is the job's answer."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.EXPIRED)

    @property
    def is_backlog(self) -> bool:
        """Counted in the endpoint's backlog (`JobQueue.depth`), which async autoscaling follows."""
        return self in (JobStatus.QUEUED, JobStatus.RUNNING)


class Job(BaseModel):
    """One asynchronous inference request: its input, its limits and its progress.

    The input is either inline (`body`) or a location the worker reads (`input_location`),
    never both. Progress fields (`attempts`, `status`, the timestamps and locations) are
    written by the queue; a submitted job leaves them at their defaults.
    """

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    inference_id: str = Field(
        default_factory=new_inference_id,
        min_length=1,
        max_length=256,
        description="Unique id of the request (SageMaker's InferenceId); submitting it twice is one job.",
    )
    endpoint: str = Field(min_length=1, max_length=256, description="Name of the endpoint that runs it.")
    content_type: str = Field("application/json", description="MIME type of the input (Content-Type).")
    accept: str = Field("application/json", description="MIME type the caller wants the result in (Accept).")
    body: bytes | None = Field(
        None,
        description=f"The input inline, at most {MAX_INLINE_BODY_BYTES} bytes (else use input_location).",
    )
    input_location: str | None = Field(
        None, description="Where the input is (`file://…` or `s3://…`), for inputs not sent inline."
    )
    created_at: AwareDatetime = Field(default_factory=utcnow, description="When it was submitted (UTC).")
    ttl_s: float = Field(
        DEFAULT_TTL_S,
        gt=0,
        description="Expire the job if no worker has started it this many seconds after created_at "
        "(SageMaker's RequestTTLSeconds). A job once started is not expired by it.",
    )
    invocation_timeout_s: float = Field(
        DEFAULT_INVOCATION_TIMEOUT_S,
        gt=0,
        description="How long one attempt may run before the worker gives up on it "
        "(SageMaker's InvocationTimeoutSeconds); enforced by the worker.",
    )
    max_attempts: int = Field(3, ge=1, description="Deliveries before the job fails for good (1 = no retry).")
    attempts: int = Field(0, ge=0, description="Times a worker has leased it so far (redeliveries included).")
    status: JobStatus = Field(JobStatus.QUEUED, description="Where the job is now.")
    failure_reason: str | None = Field(
        None, description="Why the last attempt failed; the final reason once `failed` or `expired`."
    )
    output_location: str | None = Field(None, description="Where the result is, once `succeeded`.")
    failure_location: str | None = Field(None, description="Where the error body is, once `failed`.")
    started_at: AwareDatetime | None = Field(None, description="When the latest attempt was leased (UTC).")
    finished_at: AwareDatetime | None = Field(None, description="When it reached a final status (UTC).")

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.body is None) == (self.input_location is None):
            raise ValueError("a job needs exactly one of `body` (inline) and `input_location`")
        if self.input_location is not None and not self.input_location.startswith(_INPUT_SCHEMES):
            raise ValueError(f"input_location must start with file:// or s3://, not {self.input_location!r}")
        return self

    @property
    def expires_at(self) -> datetime:
        """Past this instant a job that was never started expires instead of being leased."""
        return self.created_at + timedelta(seconds=self.ttl_s)

    def to_record(self) -> dict[str, object]:
        """The job as JSON-ready data without its body: backends keep the body apart (a BLOB, a
        hash field) so a listing never decodes megabytes of input."""
        return self.model_dump(mode="json", exclude={"body"})


class Lease(BaseModel):
    """A worker's hold on a running job until `expires_at` (extend it with `heartbeat`).

    `receipt` names this delivery: after the lease expires and the job is redelivered, the
    new holder gets a new receipt, and the old one can no longer heartbeat or fail the job.
    """

    model_config = ConfigDict(extra="forbid")

    job: Job = Field(description="The job as it was leased (status running, attempts counted).")
    receipt: str = Field(
        min_length=1, description="Token of this delivery; the queue checks it on every call."
    )
    worker: str = Field(min_length=1, description="Id of the worker holding it (for operators and logs).")
    expires_at: AwareDatetime = Field(description="When the job becomes deliverable again unless extended.")
