"""What a batch transform job is: its config (SageMaker CreateTransformJob's options) and state.

The option names follow CreateTransformJob (`SplitType`, `BatchStrategy`, `MaxPayloadInMB`,
`MaxConcurrentTransforms`, `DataProcessing.InputFilter/OutputFilter/JoinSource`,
`TransformOutput.AssembleWith/Accept`), in snake case, so a job written for SageMaker maps
field by field. What differs is said on the field: records always reach the engine one per
request, and the engine batches them continuously, so packing several records into one
payload (`MultiRecord`) buys nothing here.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from twinserve.config import Device, Dtype, Quantize

# a DNS label, as endpoint names (SageMaker's job names allow 63 characters too)
JOB_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
RecordFormat = Literal["auto", "tgi", "chat", "text", "openai-batch"]
# enough in flight to fill the engine's default batch (64 rows) with newcomers waiting
DEFAULT_CONCURRENCY = 64


class JobStatus(enum.StrEnum):
    """TransformJobStatus, as SageMaker names it (plus CompletedWithErrors)."""

    IN_PROGRESS = "InProgress"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    COMPLETED = "Completed"
    COMPLETED_WITH_ERRORS = "CompletedWithErrors"
    FAILED = "Failed"

    @property
    def is_terminal(self) -> bool:
        return self in (
            JobStatus.STOPPED,
            JobStatus.COMPLETED,
            JobStatus.COMPLETED_WITH_ERRORS,
            JobStatus.FAILED,
        )


class RayBatchSettings(BaseModel):
    """Where a `platform: ray` job runs: the cluster, and the Ray Data actor pool (one engine each)."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(
        "auto",
        min_length=1,
        description="auto (the cluster `ray start` runs on this machine), HOST:PORT (its GCS) or "
        "ray://HOST:10001 (Ray Client).",
    )
    actors: int = Field(2, ge=1, le=1024, description="Actors in the pool; each loads the model once.")
    num_cpus: float | None = Field(
        None, gt=0, description="CPUs each actor reserves; None = num_threads or 1."
    )
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs each actor reserves; None = 1 for device cuda, else 0."
    )


class TransformJobConfig(BaseModel):
    """One batch transform job: where records come from, what runs them, where answers go."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=JOB_NAME_PATTERN, description="Job name, a DNS label (1-63 of a-z, 0-9, -).")
    model: str | None = Field(
        None, description="Model reference run in-process (`default`, models:/name@alias, a folder, hf://…)."
    )
    endpoint: str | None = Field(None, description="A twinserve endpoint to send the records to instead.")
    input: str = Field(description="An input file, a folder of them, or an s3:// prefix.")
    output: str = Field(description="Folder (or s3:// prefix) for `<input-name>.out` and `.err`.")
    split_type: Literal["Line", "None"] = Field(
        "Line", description="Line: one record per line; None: each input file is one record."
    )
    batch_strategy: Literal["SingleRecord", "MultiRecord"] = Field(
        "MultiRecord",
        description=(
            "Accepted for CreateTransformJob compatibility; both send one record per request and "
            "the engine batches requests continuously (up to max_concurrent_transforms in flight)."
        ),
    )
    max_payload_mb: int = Field(
        6, ge=1, le=100, description="Largest record in MB (SageMaker's MaxPayloadInMB); larger fails alone."
    )
    max_concurrent_transforms: int = Field(
        DEFAULT_CONCURRENCY, ge=1, le=4096, description="Records in flight at once (engine or endpoint)."
    )
    input_filter: str | None = Field(None, description="JSONPath selecting the request from each record.")
    output_filter: str | None = Field(None, description="JSONPath selecting what to write from each answer.")
    join_source: Literal["None", "Input"] = Field(
        "None", description="Input: write the input record with the answer under `SageMakerOutput`."
    )
    assemble_with: Literal["Line", "None"] = Field(
        "Line", description="Line: one answer per line; None: answers back to back."
    )
    accept: Literal["application/jsonlines", "application/json"] = Field(
        "application/jsonlines", description="Answers are JSON either way, one per record."
    )
    record_format: RecordFormat = Field(
        "auto",
        description=(
            "auto: by each record's shape ({inputs} TGI, {messages} chat, {prompt} completion, "
            "{custom_id, body} OpenAI batch, anything else a text prompt); or force one."
        ),
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Default generation parameters (TGI names: max_new_tokens, temperature, …); a record's own win.",
    )
    dtype: Dtype = Field("auto", description="In-process: weights dtype.")
    device: Device = Field("auto", description="In-process: cpu, cuda or auto.")
    quantize: Quantize | None = Field(None, description="In-process: weight quantization.")
    num_threads: int | None = Field(None, ge=1, description="In-process: CPU threads for torch.")
    checkpoint_every_records: int = Field(
        32, ge=1, description="Commit (fsync outputs, then the checkpoint) after this many records …"
    )
    checkpoint_every_s: float = Field(2.0, gt=0, description="… or this many seconds, whichever comes first.")
    platform: Literal["local", "ray"] = Field(
        "local", description="local: the engine in the job's process; ray: a Ray Data actor pool."
    )
    ray: RayBatchSettings | None = Field(None, description="Only with platform ray (defaults filled in).")

    @model_validator(mode="after")
    def _one_target(self) -> TransformJobConfig:
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("give exactly one of `model` and `endpoint`")
        if self.platform == "ray":
            if self.endpoint is not None:
                raise ValueError(
                    "an endpoint job sends its records to the endpoint and needs no Ray; drop "
                    "--platform ray (the endpoint itself can run on Ray: `endpoint create --platform ray`)"
                )
            if self.ray is None:
                self.ray = RayBatchSettings()
        elif self.ray is not None:
            raise ValueError("Ray settings (--ray-address, --actors, …) need --platform ray")
        return self

    @field_validator("input_filter", "output_filter")
    @classmethod
    def _jsonpath(cls, value: str | None) -> str | None:
        if value is None or value.strip() in ("", "$"):
            return None
        from twinserve.jobs.records import compile_jsonpath

        compile_jsonpath(value)  # raises ValueError with the parser's reason
        return value

    @property
    def newline(self) -> bytes:
        return b"\n" if self.assemble_with == "Line" else b""


class FileProgress(BaseModel):
    """Committed progress through one input file."""

    records: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    done: bool = False


class TransformJob(BaseModel):
    """What `describe` shows: status, counts of committed records, tokens and timings."""

    model_config = ConfigDict(extra="forbid")

    name: str
    status: JobStatus = JobStatus.IN_PROGRESS
    creation_time: float = Field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    records_total: int | None = Field(None, description="Records in the inputs, when counted up front.")
    records_succeeded: int = 0
    records_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    transform_seconds: float = Field(0.0, description="Time spent running, over every run of the job.")
    runs: int = 0
    pid: int | None = None
    failure_reason: str | None = None
    files: dict[str, FileProgress] = Field(default_factory=dict)

    @property
    def records_done(self) -> int:
        return self.records_succeeded + self.records_failed


class JobRecord(BaseModel):
    """job.json: the config a job was created with and its latest state."""

    model_config = ConfigDict(extra="forbid")

    config: TransformJobConfig
    state: TransformJob


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def local_path(location: str) -> Path:
    return Path(location).expanduser()
