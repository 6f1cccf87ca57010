"""Which kind of deployment a workload needs: real-time, asynchronous, or batch transform.

The rules, in order (SageMaker's inference options and their limits):

1. a dataset is processed offline and no client waits (`--dataset-rows`)  → batch transform
2. clients do not wait for the answer (`--no-clients-wait`)                → async
3. one request takes longer than the 60 s real-time invocation timeout, or
   its payload exceeds the 6 MB real-time limit                            → async
4. otherwise                                                               → real-time

Each choice is explained along the four criteria of the LLM Engineer's Handbook: latency,
throughput, data size and infrastructure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

REALTIME_TIMEOUT_S = 60.0  # InvokeEndpoint: the container must answer within 60 s
REALTIME_PAYLOAD_MB = 6.0  # InvokeEndpoint request body limit
ASYNC_PAYLOAD_MB = 1024.0  # async inference: payload up to 1 GB (read from S3)
ASYNC_TIMEOUT_S = 3600.0  # async inference: up to one hour per request
BATCH_MINI_BATCH_MB = 100.0  # batch transform: MaxPayloadInMB
BYTES_PER_TOKEN = 4.0  # English text in a BPE vocabulary: ~4 characters (UTF-8 bytes) per token

CriterionName = Literal["latency", "throughput", "data size", "infrastructure"]


class DeploymentType(enum.StrEnum):
    """SageMaker's inference options the planner chooses between."""

    REAL_TIME = "real-time"
    ASYNC = "async"
    BATCH_TRANSFORM = "batch-transform"

    @property
    def keeps_endpoint(self) -> bool:
        """An endpoint runs between requests (batch transform runs instances only for the job)."""
        return self is not DeploymentType.BATCH_TRANSFORM


class Criterion(BaseModel):
    """One criterion of the choice, assessed in words with the plan's numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: CriterionName = Field(description="latency, throughput, data size or infrastructure.")
    assessment: str = Field(description="What the workload needs and how this deployment meets it.")


class DeploymentChoice(BaseModel):
    """The deployment type and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: DeploymentType = Field(description="real-time, async or batch-transform.")
    reason: str = Field(description="The rule that decided it, in one sentence.")
    criteria: list[Criterion] = Field(description="Latency, throughput, data size and infrastructure.")


def initial_type(*, clients_wait: bool | None, dataset_rows: int | None) -> tuple[DeploymentType, str]:
    """Rules 1, 2 and 4 (rule 3 needs the sized plan: `needs_async`)."""
    if dataset_rows is not None:
        return DeploymentType.BATCH_TRANSFORM, (
            f"a dataset of {dataset_rows:,} rows is processed offline and no client waits for an answer"
        )
    if clients_wait is False:
        return DeploymentType.ASYNC, "clients do not wait for the answer: requests can be queued"
    return DeploymentType.REAL_TIME, "clients wait for the answer, within a latency SLO"


def payload_mb(tokens: int) -> float:
    """Approximate size of `tokens` tokens of text, MB."""
    return tokens * BYTES_PER_TOKEN / 1e6


def needs_async(*, prompt_tokens: int, e2e_s: float | None = None) -> str | None:
    """Rule 3: why a waiting client must still be served through a queue, or None.

    The payload check needs only the prompt; the time check needs the sized plan (`e2e_s`).
    """
    if payload_mb(prompt_tokens) > REALTIME_PAYLOAD_MB:
        return (
            f"a request is ≈ {payload_mb(prompt_tokens):.1f} MB, over the {REALTIME_PAYLOAD_MB:g} MB "
            "real-time payload limit: requests go through a queue"
        )
    if e2e_s is not None and e2e_s > REALTIME_TIMEOUT_S:
        return (
            f"one request takes ≈ {e2e_s:.0f} s even on the fastest instance, over the "
            f"{REALTIME_TIMEOUT_S:.0f} s real-time invocation timeout: clients get the result through a queue"
        )
    return None


@dataclass(frozen=True)
class Facts:
    """The numbers the explanation quotes."""

    instance: str
    replicas: int
    max_replicas: int
    usd_per_hour: float
    concurrency: int
    requests_per_s: float | None
    replica_requests_per_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_ms: float
    tpot_ms: float
    ttft_slo_ms: float
    tpot_slo_ms: float
    e2e_s: float
    dataset_rows: int | None = None
    job_hours: float | None = None
    job_usd: float | None = None


def explain(kind: DeploymentType, reason: str, f: Facts) -> DeploymentChoice:
    """The choice with its four criteria, quoting the plan's numbers."""
    size_in, size_out = payload_mb(f.prompt_tokens) * 1e3, payload_mb(f.output_tokens) * 1e3
    criteria: list[tuple[CriterionName, str]]
    if kind is DeploymentType.REAL_TIME:
        rps = f.requests_per_s or 0.0
        criteria = [
            ("latency", f"clients wait: TTFT ≈ {f.ttft_ms:.0f} ms (SLO {f.ttft_slo_ms:g}), TPOT ≈ "
             f"{f.tpot_ms:.0f} ms (SLO {f.tpot_slo_ms:g}); only a warm, always-on endpoint answers that fast"),
            ("throughput", f"{rps:g} req/s × {f.e2e_s:.1f} s per request ≈ {rps * f.e2e_s:.1f} requests in "
             f"flight (Little's law); {f.replicas} replica(s) serving up to {f.concurrency} at once each"),
            ("data size", f"≈ {size_in:.1f} KB in and {size_out:.1f} KB out per request, far below the "
             f"{REALTIME_PAYLOAD_MB:g} MB payload limit; ≈ {f.e2e_s:.0f} s each, within the "
             f"{REALTIME_TIMEOUT_S:.0f} s timeout"),
            ("infrastructure", f"{f.replicas}× {f.instance} always on (${f.usd_per_hour + 1e-9:.2f}/h, billed "
             f"with or without traffic), autoscaled on concurrency up to {f.max_replicas}"),
        ]  # fmt: skip
    elif kind is DeploymentType.ASYNC:
        rps = f.requests_per_s or 0.0
        criteria = [
            ("latency", "results arrive later (polled or notified), so no TTFT/TPOT SLO binds; one "
             f"request takes ≈ {f.e2e_s:.0f} s of processing (limit {ASYNC_TIMEOUT_S / 60:.0f} min)"),
            ("throughput", f"{rps:g} req/s on average; the queue absorbs bursts, so replicas are sized "
             f"for the mean: {f.replicas}× ≈ {f.replica_requests_per_s:.2f} req/s each"),
            ("data size", f"≈ {size_in:.1f} KB per request; async accepts payloads up to "
             f"{ASYNC_PAYLOAD_MB / 1024:g} GB, read from object storage"),
            ("infrastructure", f"{f.instance} behind a durable queue; it can scale to 0 replicas when the "
             f"queue is empty (${f.usd_per_hour + 1e-9:.2f}/h while {f.replicas} run)"),
        ]  # fmt: skip
    else:
        rows = f.dataset_rows or 0
        tokens = rows * (f.prompt_tokens + f.output_tokens)
        criteria = [
            ("latency", "no client waits for a single answer; what matters is when the whole run ends"),
            ("throughput", f"{rows:,} rows × {f.prompt_tokens + f.output_tokens} tokens = "
             f"{tokens / 1e6:,.1f} M tokens; ≈ {f.job_hours or 0:.2f} h on {f.replicas}× {f.instance} "
             f"at ≈ {f.replica_requests_per_s:.2f} rows/s each"),
            ("data size", f"≈ {rows * payload_mb(f.prompt_tokens):,.1f} MB of prompts read from storage "
             f"in mini-batches of ≤ {BATCH_MINI_BATCH_MB:g} MB; results written next to them"),
            ("infrastructure", f"instances exist only for the job (≈ ${(f.job_usd or 0) + 1e-9:,.2f} on-demand); "
             "no endpoint is kept running"),
        ]  # fmt: skip
    return DeploymentChoice(
        type=kind, reason=reason, criteria=[Criterion(name=n, assessment=a) for n, a in criteria]
    )
