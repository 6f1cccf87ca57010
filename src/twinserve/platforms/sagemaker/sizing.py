"""Instance type, TGI limits and timeouts of one variant, from the planner, before any AWS call.

`twinserve plan` already sizes a model for each instance of its catalog (memory per GPU, KV
budget, shards); here it is asked the deploy-time question: the cheapest GPU instance that
holds the model (or: does it fit the one given?) and the limits TGI gets there. SLOs are
left out on purpose (a user who deploys has chosen; the planner's latency estimates are for
`plan`), so only memory decides. The variant's own `limits` win over the planner's.

An instance type outside the planner's catalog is accepted when it is a SageMaker hosting
type by its name; it is then not sized (TGI picks its own limits and uses every GPU).
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from twinserve.deploy.platform_config import SageMakerSettings
from twinserve.deploy.spec import VariantConfig
from twinserve.errors import ValidationError
from twinserve.planner.instances import CATALOG, InstanceType
from twinserve.planner.model_shape import ModelSource
from twinserve.planner.plan import LOAD_SECONDS_PER_GIB, Plan, PlanRequest, make_plan
from twinserve.planner.sizing import GIB

# SageMaker real-time hosting families (ml.<family>.<size>); GPU families run the TGI DLC
GPU_FAMILIES = frozenset({"g4dn", "g5", "g6", "g6e", "g7e", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en"})
OTHER_FAMILIES = frozenset(
    {"t2", "t3", "m5", "m5d", "m6g", "m6gd", "m6i", "m6id", "m7i", "c5", "c5d", "c6g", "c6gd", "c6gn",
     "c6i", "c6id", "c7g", "c7i", "r5", "r5d", "r6g", "r6gd", "r6i", "r6id", "r7i", "r8g", "inf1", "inf2",
     "trn1", "trn1n", "trn2"}
)  # fmt: skip
_INSTANCE = re.compile(r"^ml\.(?P<family>[a-z0-9]+)\.(?P<size>medium|large|xlarge|\d+xlarge|metal)$")
S3_BYTES_PER_S = 100e6  # SageMaker's download of uncompressed S3 data is faster; be conservative
HUB_BYTES_PER_S = 50e6  # the container downloads from the Hub at start-up
_STARTUP_MARGIN_S = 300  # CUDA kernels, graphs and warm-up after the weights are loaded
_MIN_TIMEOUT_S, _MAX_TIMEOUT_S = 600, 3600  # SageMaker's range is 60..3600; never below 10 min
DEPLOY_PROMPT_TOKENS, DEPLOY_OUTPUT_TOKENS = 2048, 512


class VariantSizing(BaseModel):
    """What the planner (or the user) settled for one variant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instance_type: str = Field(description="SageMaker instance type.")
    env: dict[str, str] = Field(description="TGI env from the plan: SM_NUM_GPUS, DTYPE, limits, quantize.")
    model_bytes: int | None = Field(None, description="Weights' size in bytes, when known.")
    download_timeout_s: int = Field(description="ModelDataDownloadTimeoutInSeconds.")
    startup_timeout_s: int = Field(description="ContainerStartupHealthCheckTimeoutInSeconds.")
    notes: list[str] = Field(
        default_factory=list, description="What the user should know (shown as progress)."
    )


def check_instance_type(name: str, *, dlc: bool) -> InstanceType | None:
    """The catalog row of `name` (None for a valid type the catalog lacks); ValidationError otherwise."""
    for row in CATALOG:
        if row.name == name:
            if dlc and not row.is_gpu:
                raise _not_gpu(name)
            return row
    m = _INSTANCE.fullmatch(name)
    family = m.group("family") if m else None
    if family is None or family not in GPU_FAMILIES | OTHER_FAMILIES:
        raise ValidationError(
            f"{name!r} is not a SageMaker hosting instance type (e.g. ml.g5.2xlarge, ml.g6e.xlarge, "
            f"ml.p4d.24xlarge); the planner knows: {', '.join(r.name for r in CATALOG)}",
            param="platform.sagemaker.instance_type",
        )
    if dlc and family not in GPU_FAMILIES:
        raise _not_gpu(name)
    return None


def _not_gpu(name: str) -> ValidationError:
    return ValidationError(
        f"{name} has no NVIDIA GPU: the Hugging Face LLM DLC (TGI) needs one (ml.g5, ml.g6, ml.g6e, "
        "ml.p4d, ml.p5 …); for a CPU or Neuron container give --image",
        param="platform.sagemaker.instance_type",
    )


def size_variant(
    variant: VariantConfig,
    settings: SageMakerSettings,
    source: ModelSource | None,
    *,
    dlc: bool,
    model_bytes: int | None,
    from_hub: bool,
) -> VariantSizing:
    """Instance, TGI env and timeouts for `variant`; ValidationError when it cannot be served.

    `source` is the model's shape (None when its config.json could not be read: then the
    instance type must be given and nothing is sized). `from_hub`: the container downloads
    the weights at start-up, so the health check must wait for that too.
    """
    given = settings.instance_type
    row = check_instance_type(given, dlc=dlc) if given else None
    quantize = variant.quantize or (source.card_quantize if source else None)
    if dlc and quantize in ("int8", "int4"):
        raise ValidationError(
            f"{quantize} is twinserve's CPU quantization; TGI on a GPU quantizes with bitsandbytes or "
            "bitsandbytes-nf4 (variant quantize:)",
            param="variants.quantize",
        )
    notes: list[str] = []
    env: dict[str, str] = {}
    if source is None or (given and row is None):
        if not given:
            raise ValidationError(
                f"cannot size {variant.load_ref} (its config.json could not be read): give --instance-type",
                param="platform.sagemaker.instance_type",
            )
        why = (
            "its config.json could not be read"
            if source is None
            else f"{given} is not in the planner's catalog"
        )
        notes.append(f"variant {variant.name}: not sized ({why}); TGI picks its limits and uses every GPU")
        instance = given
    else:
        plan = _plan(variant, source, quantize, row, dlc=dlc)
        instance = plan.instance.instance_type
        env = {k: v for k, v in plan.sagemaker_env.items() if k != "HF_MODEL_ID"}
        if quantize is not None or not dlc:
            env.pop("DTYPE", None)  # TGI chooses the compute dtype of a quantized model
        if model_bytes is None:
            model_bytes = math.ceil(plan.memory.weights_total_gib * GIB)
        if not given:
            notes.append(
                f"variant {variant.name}: {instance} ({plan.instance.hardware}, "
                f"${plan.instance.usd_per_hour:.3f}/h on demand), the cheapest that holds {source.shape.name}"
            )
    if quantize is not None:
        env["HF_MODEL_QUANTIZE"] = quantize
    env.update(variant.limits.serve_env())  # the variant's own limits win
    download, startup = _timeouts(model_bytes, from_hub)
    return VariantSizing(
        instance_type=instance,
        env=env,
        model_bytes=model_bytes,
        download_timeout_s=settings.model_data_download_timeout_s or download,
        startup_timeout_s=settings.startup_health_check_timeout_s or startup,
        notes=notes,
    )


def _plan(
    variant: VariantConfig, source: ModelSource, quantize: str | None, row: InstanceType | None, *, dlc: bool
) -> Plan:
    """The planner's plan on `row` (or its cheapest fit; a GPU one for the DLC)."""
    plan = _make(variant, source, quantize, row.name if row else None)
    if dlc and row is None and plan.instance.num_gpus == 0:
        gpus = [
            c.instance_type
            for c in plan.candidates
            if c.fits and any(r.name == c.instance_type and r.is_gpu for r in CATALOG)
        ]
        if not gpus:
            raise ValidationError(
                f"no GPU instance of the planner's catalog holds {source.shape.name}; give --instance-type"
            )
        plan = _make(variant, source, quantize, gpus[0])
    return plan


def _make(variant: VariantConfig, source: ModelSource, quantize: str | None, instance: str | None) -> Plan:
    ctx = source.shape.max_position_embeddings
    max_input = variant.limits.max_input_tokens or source.card_max_input_tokens
    max_total = variant.limits.max_total_tokens or source.card_max_total_tokens
    # the sizes one request is planned for: a long chat by default (the plan's limits are the
    # next powers of two: 2048 / 4096 tokens on a long-context model), the given limits' else
    prompt = min(DEPLOY_PROMPT_TOKENS, ctx // 2, max_input or ctx)
    output = max(1, min(DEPLOY_OUTPUT_TOKENS, (max_total or ctx) - prompt))
    dtype = "bfloat16" if variant.dtype == "auto" else variant.dtype
    try:
        request = PlanRequest.model_validate(
            {
                "model": source.shape,
                "model_ref": variant.load_ref,
                "dtype": dtype,
                "quantize": quantize,
                "requests_per_s": 1.0,  # traffic sets the replica count, which the config gives
                "prompt_tokens": prompt,
                "output_tokens": output,
                "max_input_tokens": max_input,
                "max_total_tokens": max_total,
                "ttft_slo_ms": 1e9,  # memory alone decides (see the module docstring)
                "tpot_slo_ms": 1e9,
                "instance": instance,
            }
        )
    except PydanticValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ValidationError(f"variant {variant.name}: {problems}", param="variants.limits") from exc
    try:
        return make_plan(request)
    except ValidationError as exc:
        where = f"on {instance}" if instance else "on any instance of the planner's catalog"
        raise ValidationError(
            f"variant {variant.name}: {source.shape.name} does not fit {where}: {exc.message}",
            param="platform.sagemaker.instance_type",
        ) from exc


def _timeouts(model_bytes: int | None, from_hub: bool) -> tuple[int, int]:
    """(ModelDataDownloadTimeoutInSeconds, ContainerStartupHealthCheckTimeoutInSeconds) for the size."""
    size = model_bytes or 0
    download = 2 * size / S3_BYTES_PER_S + _STARTUP_MARGIN_S
    startup = size / GIB * LOAD_SECONDS_PER_GIB + _STARTUP_MARGIN_S
    if from_hub:
        startup += 2 * size / HUB_BYTES_PER_S
    return _clamp(download), _clamp(startup)


def _clamp(seconds: float) -> int:
    return int(min(_MAX_TIMEOUT_S, max(_MIN_TIMEOUT_S, math.ceil(seconds))))
