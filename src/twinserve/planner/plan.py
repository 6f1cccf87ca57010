"""`make_plan`: from a model and its expected traffic to a deployment an operator can create.

```
PlanRequest ──make_plan──► Plan
  model shape, dtype,        deployment type + why (latency, throughput, data size, infrastructure)
  quantization, traffic,     TGI limits, memory breakdown per GPU, instance type × replicas + $/h,
  SLOs, clients wait?        roofline latency/throughput, autoscaling policy, EndpointConfig
```
`make_plan` is pure (no I/O, no clock) and fast: every catalog instance is sized
(`sizing.py`), the cheapest that fits, meets the SLOs and carries the traffic wins, and the
others are kept as `candidates` with the reason they lost. Reading a model's shape from a
folder or the registry happens before, in `model_shape.resolve_source`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from twinserve.config import Quantize
from twinserve.deploy.policies import TargetTrackingPolicy
from twinserve.deploy.spec import EndpointConfig, ServingLimits
from twinserve.errors import ValidationError
from twinserve.planner.deployment import (
    ASYNC_TIMEOUT_S,
    REALTIME_TIMEOUT_S,
    DeploymentChoice,
    DeploymentType,
    Facts,
    explain,
    initial_type,
    needs_async,
)
from twinserve.planner.instances import (
    CATALOG,
    HOURS_PER_MONTH,
    PRICE_REGION,
    PRICES_CHECKED,
    InstanceType,
    get_instance,
)
from twinserve.planner.model_shape import ModelShape
from twinserve.planner.sizing import (
    BANDWIDTH_UTILIZATION,
    FLOPS_UTILIZATION,
    Misfit,
    PlanDtype,
    ReplicaMemory,
    ReplicaSpeed,
    Workload,
    size_memory,
    size_speed,
)

PLACEHOLDER_REF = "models:/llm-twin@champion"
TARGET_UTILIZATION = 0.8  # plan replicas at 80% of their capacity: queues stay short, bursts fit
MAX_REPLICAS = 64  # VariantConfig.replicas / autoscaling max_replicas upper bound
DEFAULT_PREFILL_TOKENS = 4096  # TGI's default MAX_BATCH_PREFILL_TOKENS
LOAD_SECONDS_PER_GIB = 10.0  # startup timeout: weights load at >= ~100 MB/s, whatever the store
_DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}


class NoFitError(ValidationError):
    """No instance of the catalog can serve the request (too big, or SLOs too tight)."""


class PlanRequest(BaseModel):
    """What to plan for: the model, how it runs, the traffic and the latency it must meet."""

    model_config = ConfigDict(extra="forbid")

    model: ModelShape = Field(description="Architecture facts (model_shape.resolve_source / preset).")
    model_ref: str | None = Field(
        None,
        min_length=1,
        description=f"Reference for the EndpointConfig; None = {PLACEHOLDER_REF} (placeholder).",
    )
    input_notes: list[str] = Field(
        default_factory=list,
        description="Caveats about the inputs: how the shape was found, defaults assumed.",
    )
    dtype: PlanDtype = Field(
        "bfloat16", description="bfloat16 | float16 | float32 (bf16/fp16/fp32 accepted)."
    )
    quantize: Quantize | None = Field(
        None, description="int8 (CPU dynamic) | bitsandbytes (8-bit) | bitsandbytes-nf4 (4-bit); None = none."
    )
    requests_per_s: float | None = Field(
        None, gt=0, description="Expected average arrival rate; required unless dataset_rows is given."
    )
    prompt_tokens: int = Field(512, ge=1, description="Expected prompt length, tokens.")
    output_tokens: int = Field(256, ge=1, description="Expected generated tokens per request.")
    max_input_tokens: int | None = Field(
        None, ge=1, description="MAX_INPUT_TOKENS; None = next power of 2 ≥ prompt."
    )
    max_total_tokens: int | None = Field(
        None, ge=2, description="MAX_TOTAL_TOKENS; None = next power of 2 ≥ max input + output."
    )
    ttft_slo_ms: float = Field(2000.0, gt=0, description="Time-to-first-token SLO (real-time only), ms.")
    tpot_slo_ms: float = Field(100.0, gt=0, description="Time-per-output-token SLO (real-time only), ms.")
    clients_wait: bool | None = Field(
        None, description="Clients wait for the answer; None = yes, unless dataset_rows is given."
    )
    dataset_rows: int | None = Field(
        None, ge=1, description="Rows of an offline dataset: plans a batch transform."
    )
    deadline_hours: float | None = Field(None, gt=0, description="Batch only: finish within this many hours.")
    peak_factor: float = Field(2.0, ge=1, le=64, description="Peak traffic ÷ average: sets max_replicas.")
    endpoint_name: str = Field("llm-twin", pattern=_DNS_LABEL, description="Name in the EndpointConfig.")
    instance: str | None = Field(None, description="Pin an instance type instead of choosing the cheapest.")

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: object) -> object:
        return _DTYPE_ALIASES.get(v.lower(), v.lower()) if isinstance(v, str) else v

    @field_validator("instance")
    @classmethod
    def _known_instance(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                get_instance(v)
            except ValidationError as exc:
                raise ValueError(exc.message) from exc
        return v

    @model_validator(mode="after")
    def _coherent(self) -> PlanRequest:
        if self.dataset_rows is None and self.requests_per_s is None:
            raise ValueError(
                "give the expected traffic (requests_per_s), or dataset_rows for an offline dataset"
            )
        if self.dataset_rows is not None and self.clients_wait:
            raise ValueError("dataset_rows plans an offline batch: no client waits (drop clients_wait)")
        if self.deadline_hours is not None and self.dataset_rows is None:
            raise ValueError("deadline_hours applies to an offline batch (dataset_rows)")
        i, t = self.max_input_tokens, self.max_total_tokens
        ctx = self.model.max_position_embeddings
        if i is not None and t is not None and i >= t:
            raise ValueError(f"max_input_tokens ({i}) must be < max_total_tokens ({t})")
        if t is not None and t > ctx:
            raise ValueError(f"max_total_tokens ({t}) exceeds the model's context ({ctx} tokens)")
        if i is not None and self.prompt_tokens > i:
            raise ValueError(f"prompt_tokens ({self.prompt_tokens}) exceeds max_input_tokens ({i})")
        if t is not None and self.prompt_tokens + self.output_tokens > t:
            raise ValueError(
                f"prompt_tokens + output_tokens ({self.prompt_tokens + self.output_tokens}) "
                f"exceeds max_total_tokens ({t})"
            )
        if self.prompt_tokens + self.output_tokens > ctx:
            raise ValueError(
                f"prompt_tokens + output_tokens ({self.prompt_tokens + self.output_tokens}) "
                f"exceeds the model's context ({ctx} tokens)"
            )
        return self


class InstanceChoice(BaseModel):
    """The instance type, how many, and what they cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance_type: str = Field(description="SageMaker instance type.")
    hardware: str = Field(description="GPUs (or vCPUs) of one instance, in words.")
    num_gpus: int = Field(
        ge=0, description="GPUs one replica shards over (SM_NUM_GPUS / NUM_SHARD); 0 on CPU."
    )
    replicas: int = Field(ge=1, description="Instances (one replica each) for the expected traffic.")
    max_replicas: int = Field(ge=1, description="Instances at peak traffic (autoscaling bound).")
    usd_per_hour: float = Field(description="On-demand price of one instance.")
    usd_per_hour_total: float = Field(description="replicas × usd_per_hour.")
    usd_per_month: float = Field(description=f"usd_per_hour_total × {HOURS_PER_MONTH:g} h.")
    price_region: str = Field(PRICE_REGION, description="Region of the price.")
    price_date: str = Field(description="When the price was taken (ISO date).")


class BatchJob(BaseModel):
    """An offline run over a dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(description="Rows (requests) in the dataset.")
    tokens: int = Field(description="Prompt + output tokens over all rows.")
    hours: float = Field(
        description="Wall-clock hours with `instances` in parallel (model loading excluded)."
    )
    instances: int = Field(description="Instances run in parallel.")
    usd: float = Field(description="On-demand cost of the run.")


class Candidate(BaseModel):
    """One catalog instance as the planner judged it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance_type: str = Field(description="SageMaker instance type.")
    hardware: str = Field(description="What it has.")
    fits: bool = Field(description="It holds the model, meets the SLOs and can carry the traffic.")
    replicas: int | None = Field(None, description="Instances needed, when it fits.")
    cost_usd: float | None = Field(
        None, description="When it fits: $/h of its replicas; for a batch transform, $ of the whole run."
    )
    note: str = Field(description="Why it lost (or the numbers when it fits).")


class Plan(BaseModel):
    """A deployment recommendation, with every number that led to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request: PlanRequest = Field(description="What was asked.")
    model_ref: str = Field(description="The reference written into the EndpointConfig.")
    model_ref_is_placeholder: bool = Field(description="True when no --model was given.")
    deployment: DeploymentChoice = Field(description="Deployment type and why.")
    limits: ServingLimits = Field(description="TGI limits per replica.")
    memory: ReplicaMemory = Field(description="Memory breakdown of one replica.")
    speed: ReplicaSpeed = Field(description="Roofline latency and throughput of one replica.")
    instance: InstanceChoice = Field(description="Instance type, count and cost.")
    autoscaling: TargetTrackingPolicy | None = Field(None, description="None for batch transform.")
    batch: BatchJob | None = Field(None, description="The offline run, for batch transform.")
    endpoint_concurrency: float | None = Field(
        None, description="Requests in flight over the endpoint (Little's law: req/s × E2E)."
    )
    sagemaker_env: dict[str, str] = Field(
        description="Environment of the HF LLM (TGI) container on SageMaker."
    )
    endpoint_config: EndpointConfig = Field(description="What `twinserve endpoint create --config` reads.")
    candidates: list[Candidate] = Field(description="Every instance considered, cheapest first.")
    notes: list[str] = Field(default_factory=list, description="Assumptions and caveats.")


@dataclass(frozen=True)
class _Limits:
    max_input: int
    max_total: int
    prefill: int


@dataclass(frozen=True)
class _Option:
    instance: InstanceType
    memory: ReplicaMemory | None = None
    speed: ReplicaSpeed | None = None
    replicas: int = 0
    max_replicas: int = 0
    job_hours: float | None = None  # batch: one instance's hours for the whole dataset
    misfit: str | None = None

    @property
    def fits(self) -> bool:
        return self.misfit is None

    @property
    def cost(self) -> float:
        """What the choice minimises: $/h of the replicas, or $ of the batch run."""
        if self.job_hours is not None:
            return self.job_hours * self.instance.usd_per_hour
        return self.replicas * self.instance.usd_per_hour


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _token_limits(req: PlanRequest) -> _Limits:
    ctx = req.model.max_position_embeddings
    max_input = req.max_input_tokens or _pow2(req.prompt_tokens)
    if req.max_total_tokens is not None:
        max_total = req.max_total_tokens
    else:
        max_total = min(_pow2(max_input + req.output_tokens), ctx)
    if req.max_input_tokens is None:  # keep room for the expected output under a clamped total
        max_input = max(req.prompt_tokens, min(max_input, max_total - req.output_tokens))
    if max_input >= max_total:
        raise ValidationError(
            f"max_input_tokens ({max_input}) must be < max_total_tokens ({max_total}); "
            "give --max-total-tokens larger, or --max-input-tokens smaller"
        )
    return _Limits(max_input, max_total, max(max_input, DEFAULT_PREFILL_TOKENS))


def _incompatible(instance: InstanceType, quantize: Quantize | None) -> str | None:
    if quantize == "int8" and instance.is_gpu:
        return "int8 is the CPU dynamic quantization; on GPU use bitsandbytes"
    if quantize == "int4" and instance.is_gpu:
        return "int4 is a CPU kernel; on GPU use bitsandbytes-nf4"
    if quantize in ("bitsandbytes", "bitsandbytes-nf4") and not instance.is_gpu:
        return f"{quantize} needs CUDA"
    return None


def _evaluate(instance: InstanceType, req: PlanRequest, lim: _Limits, kind: DeploymentType) -> _Option:
    if reason := _incompatible(instance, req.quantize):
        return _Option(instance, misfit=reason)
    memory = size_memory(
        req.model, instance, dtype=req.dtype, quantize=req.quantize,
        max_total_tokens=lim.max_total, max_batch_prefill_tokens=lim.prefill,
    )  # fmt: skip
    if isinstance(memory, Misfit):
        return _Option(instance, misfit=memory.reason)
    realtime = kind is DeploymentType.REAL_TIME
    workload = Workload(
        prompt_tokens=req.prompt_tokens, output_tokens=req.output_tokens, max_input_tokens=lim.max_input,
        ttft_slo_ms=req.ttft_slo_ms if realtime else None, tpot_slo_ms=req.tpot_slo_ms if realtime else None,
    )  # fmt: skip
    speed = size_speed(req.model, instance, memory, workload, quantized=req.quantize is not None)
    if isinstance(speed, Misfit):
        return _Option(instance, memory=memory, misfit=speed.reason)
    if kind is DeploymentType.ASYNC and speed.e2e_s > ASYNC_TIMEOUT_S:
        return _Option(
            instance, memory, speed, misfit=f"≈ {speed.e2e_s / 60:.0f} min per request > 1 h async limit"
        )
    if kind is DeploymentType.BATCH_TRANSFORM:
        assert req.dataset_rows is not None
        hours = req.dataset_rows / speed.requests_per_s / 3600
        count = math.ceil(hours / req.deadline_hours - 1e-9) if req.deadline_hours else 1
        if count > MAX_REPLICAS:
            return _Option(
                instance, memory, speed, misfit=f"needs {count} instances for the deadline (> {MAX_REPLICAS})"
            )
        return _Option(instance, memory, speed, replicas=count, max_replicas=count, job_hours=hours)
    assert req.requests_per_s is not None
    capacity = speed.requests_per_s * TARGET_UTILIZATION
    replicas = max(1, math.ceil(req.requests_per_s / capacity - 1e-9))
    if replicas > MAX_REPLICAS:
        return _Option(
            instance, memory, speed,
            misfit=f"needs {replicas} replicas at {speed.requests_per_s:.2f} req/s each (> {MAX_REPLICAS})",
        )  # fmt: skip
    peak = math.ceil(req.requests_per_s * req.peak_factor / capacity - 1e-9)
    return _Option(
        instance, memory, speed, replicas=replicas, max_replicas=min(MAX_REPLICAS, max(replicas, peak))
    )


def _evaluate_all(req: PlanRequest, lim: _Limits, kind: DeploymentType) -> list[_Option]:
    pool = [get_instance(req.instance)] if req.instance else list(CATALOG)
    options = [_evaluate(i, req, lim, kind) for i in pool]
    if kind is DeploymentType.REAL_TIME:  # rule 3 of deployment.py, per instance
        options = [
            o if not o.fits or o.speed is None or o.speed.e2e_s <= REALTIME_TIMEOUT_S
            else _Option(o.instance, o.memory, o.speed, misfit=f"≈ {o.speed.e2e_s:.0f} s per request > "
                         f"{REALTIME_TIMEOUT_S:.0f} s real-time timeout")
            for o in options
        ]  # fmt: skip
    return sorted(options, key=lambda o: (not o.fits, o.cost, o.instance.usd_per_hour))


def _no_fit(options: list[_Option], req: PlanRequest) -> NoFitError:
    if req.instance:
        return NoFitError(f"{req.instance} cannot serve {req.model.name}: {options[0].misfit}")
    lines = "\n".join(f"  {o.instance.name}: {o.misfit}" for o in options)
    return NoFitError(
        f"no instance in the catalog can serve {req.model.name} with these limits and SLOs:\n{lines}\n"
        "Relax the SLOs (--ttft-slo-ms, --tpot-slo-ms), shorten the limits, or quantize (--quantize)."
    )


def make_plan(request: PlanRequest) -> Plan:
    """The cheapest deployment that holds the model, meets the SLOs and carries the traffic.

    NoFitError (422) when nothing in the catalog does; the message names each instance's reason.
    """
    lim = _token_limits(request)
    kind, reason = initial_type(clients_wait=request.clients_wait, dataset_rows=request.dataset_rows)
    if kind is DeploymentType.REAL_TIME and (why := needs_async(prompt_tokens=request.prompt_tokens)):
        kind, reason = DeploymentType.ASYNC, why
    options = _evaluate_all(request, lim, kind)
    if not options[0].fits and kind is DeploymentType.REAL_TIME:
        # some instances met the SLOs, but a request lasts longer than a real-time invocation may
        timed_out = [
            o.speed.e2e_s for o in options if o.speed is not None and o.speed.e2e_s > REALTIME_TIMEOUT_S
        ]
        if timed_out:
            kind = DeploymentType.ASYNC
            reason = needs_async(prompt_tokens=request.prompt_tokens, e2e_s=min(timed_out)) or reason
            options = _evaluate_all(request, lim, kind)
    if not options[0].fits:
        raise _no_fit(options, request)
    return _assemble(request, lim, kind, reason, options)


def _assemble(
    req: PlanRequest, lim: _Limits, kind: DeploymentType, reason: str, options: list[_Option]
) -> Plan:
    best = options[0]
    assert best.memory is not None and best.speed is not None
    memory, speed, inst = best.memory, best.speed, best.instance
    limits = ServingLimits(
        max_input_tokens=lim.max_input,
        max_total_tokens=lim.max_total,
        max_batch_prefill_tokens=min(lim.prefill, memory.kv_budget_tokens),
        max_batch_total_tokens=memory.kv_budget_tokens,
        max_concurrent_requests=2 * speed.concurrency,  # one batch running, one waiting; more get 429
    )
    batch = None
    if best.job_hours is not None:
        assert req.dataset_rows is not None
        batch = BatchJob(
            rows=req.dataset_rows, tokens=req.dataset_rows * (req.prompt_tokens + req.output_tokens),
            hours=best.job_hours / best.replicas, instances=best.replicas, usd=best.cost,
        )  # fmt: skip
    policy = None
    if kind is DeploymentType.ASYNC:  # jobs wait in a queue: scale on it, down to zero when idle
        policy = TargetTrackingPolicy(
            metric="backlog_per_replica",
            target=float(speed.concurrency),
            min_replicas=0,
            max_replicas=best.max_replicas,
        )
    elif kind.keeps_endpoint:
        policy = TargetTrackingPolicy(
            metric="concurrent_requests_per_replica",
            target=round(max(1.0, speed.concurrency * TARGET_UTILIZATION), 1),
            min_replicas=best.replicas,
            max_replicas=best.max_replicas,
        )
    ref = req.model_ref or PLACEHOLDER_REF
    choice = InstanceChoice(
        instance_type=inst.name, hardware=inst.hardware, num_gpus=memory.devices if inst.is_gpu else 0,
        replicas=best.replicas, max_replicas=best.max_replicas, usd_per_hour=inst.usd_per_hour,
        usd_per_hour_total=best.replicas * inst.usd_per_hour,
        usd_per_month=best.replicas * inst.usd_per_hour * HOURS_PER_MONTH, price_date=inst.price_date.isoformat(),
    )  # fmt: skip
    facts = Facts(
        instance=inst.name, replicas=best.replicas, max_replicas=best.max_replicas,
        usd_per_hour=choice.usd_per_hour_total, concurrency=speed.concurrency, requests_per_s=req.requests_per_s,
        replica_requests_per_s=speed.requests_per_s, prompt_tokens=req.prompt_tokens,
        output_tokens=req.output_tokens, ttft_ms=speed.ttft_ms, tpot_ms=speed.tpot_ms,
        ttft_slo_ms=req.ttft_slo_ms, tpot_slo_ms=req.tpot_slo_ms, e2e_s=speed.e2e_s,
        dataset_rows=req.dataset_rows, job_hours=batch.hours if batch else None, job_usd=batch.usd if batch else None,
    )  # fmt: skip
    concurrency = req.requests_per_s * speed.e2e_s if req.requests_per_s and batch is None else None
    return Plan(
        request=req,
        model_ref=ref,
        model_ref_is_placeholder=req.model_ref is None,
        deployment=explain(kind, reason, facts),
        limits=limits,
        memory=memory,
        speed=speed,
        instance=choice,
        autoscaling=policy,
        batch=batch,
        endpoint_concurrency=concurrency,
        sagemaker_env=_sagemaker_env(ref, req, memory, limits),
        endpoint_config=_endpoint_config(req, ref, best, memory, limits, policy, kind),
        candidates=[_candidate(o) for o in options],
        notes=_notes(req, kind, memory, inst, best.replicas),
    )


def _sagemaker_env(
    ref: str, req: PlanRequest, memory: ReplicaMemory, limits: ServingLimits
) -> dict[str, str]:
    env = {"HF_MODEL_ID": ref}
    if memory.device == "cuda":
        env["SM_NUM_GPUS"] = str(memory.devices)
        env["DTYPE"] = memory.dtype
    env.update(limits.serve_env())
    if req.quantize is not None:
        env["HF_MODEL_QUANTIZE"] = req.quantize
    return env


def _endpoint_config(
    req: PlanRequest,
    ref: str,
    best: _Option,
    memory: ReplicaMemory,
    limits: ServingLimits,
    policy: TargetTrackingPolicy | None,
    kind: DeploymentType,
) -> EndpointConfig:
    variant: dict[str, Any] = {
        "name": "primary",
        "model": ref,
        "replicas": best.replicas,
        "device": memory.device,
        "dtype": memory.dtype,
        "limits": limits.model_dump(exclude_none=True),
    }
    if req.quantize is not None:
        variant["quantize"] = req.quantize
    if memory.device == "cpu":
        variant["threads"] = max(1, best.instance.vcpus // 2)  # one torch thread per physical core
    data: dict[str, Any] = {
        "name": req.endpoint_name,
        "variants": [variant],
        "startup_timeout_s": max(600.0, math.ceil(memory.weights_total_gib * LOAD_SECONDS_PER_GIB)),
    }
    if policy is not None:
        data["autoscaling"] = policy.model_dump()
    if kind is DeploymentType.ASYNC:
        assert best.speed is not None
        data["async"] = {"max_concurrent_invocations_per_replica": best.speed.concurrency}
    return EndpointConfig.model_validate(data)


def _candidate(o: _Option) -> Candidate:
    if not o.fits:
        return Candidate(
            instance_type=o.instance.name, hardware=o.instance.hardware, fits=False, note=o.misfit or ""
        )
    assert o.speed is not None and o.memory is not None
    s = o.speed
    note = (
        f"{s.concurrency} concurrent, {s.requests_per_s:.2f} req/s per replica, "
        f"TTFT {s.ttft_ms:.0f} ms, TPOT {s.tpot_ms:.0f} ms"
    )
    if o.job_hours is not None:
        note = f"{o.job_hours:.2f} instance-hours, {s.requests_per_s:.2f} rows/s per instance"
    return Candidate(
        instance_type=o.instance.name, hardware=o.instance.hardware, fits=True, replicas=o.replicas,
        cost_usd=o.cost, note=note,
    )  # fmt: skip


def _notes(
    req: PlanRequest, kind: DeploymentType, memory: ReplicaMemory, inst: InstanceType, replicas: int
) -> list[str]:
    notes = list(req.input_notes)
    if req.model_ref is None:
        notes.append(
            f"no --model given: the EndpointConfig names {PLACEHOLDER_REF} as a placeholder; "
            "register the model under that alias or edit `model:`"
        )
    if req.dtype == "bfloat16" and inst.gpu is not None and not inst.gpu.bf16:
        notes.append(f"{inst.gpu.name} has no bfloat16: the plan runs float16 (same size)")
    if req.quantize == "int8":
        notes.append("int8 quantizes the linear layers only; activations and the KV cache stay float32")
    if req.quantize == "int4":
        notes.append(
            "int4 is for one stream at a time: its kernel beats bf16 at 1-3 rows and is slower from 4 "
            "(batches and prefill); activations and the KV cache are bfloat16"
        )
    if kind is DeploymentType.REAL_TIME and replicas == 1:
        notes.append(
            "one replica is a single point of failure: for production run at least 2 (SageMaker spreads "
            "instances over availability zones): set replicas and min_replicas to 2 in the YAML"
        )
    if kind is DeploymentType.ASYNC:
        notes.append(
            "async: the EndpointConfig has an `async:` block and scales on the queue backlog per replica "
            "(SageMaker ApproximateBacklogSizePerInstance) from 0 replicas when idle; give it an "
            "output_location (s3:// on SageMaker) and webhooks or SNS topics (docs/async.md)"
        )
    if kind is DeploymentType.BATCH_TRANSFORM:
        notes.append(
            "batch transform: run the job with these limits and instance type; the EndpointConfig (fixed "
            "replicas, no autoscaling) serves the same replicas locally for a dry run"
        )
    notes.append(
        f"latency and throughput are roofline estimates (decode at {BANDWIDTH_UTILIZATION:.0%} of peak "
        f"memory bandwidth, prefill at {FLOPS_UTILIZATION:.0%} of peak FLOPS): measure with "
        "`twinserve bench serve` before committing to a budget"
    )
    notes.append(
        f"prices: on-demand SageMaker hosting, {PRICE_REGION}, taken {PRICES_CHECKED.isoformat()}; "
        "they change: check https://aws.amazon.com/sagemaker/ai/pricing/"
    )
    return notes
