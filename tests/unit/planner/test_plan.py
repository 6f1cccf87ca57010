"""make_plan: instance choice, deployment rules, limits, autoscaling, and the EndpointConfig YAML."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError as PydanticValidationError

from twinserve.deploy.spec import EndpointConfig
from twinserve.planner.deployment import DeploymentType
from twinserve.planner.instances import get_instance
from twinserve.planner.model_shape import preset
from twinserve.planner.plan import PLACEHOLDER_REF, NoFitError, Plan, PlanRequest, make_plan
from twinserve.planner.render import plan_yaml

# The LLM Engineer's Handbook: TwinLlama-3.1-8B behind TGI with these limits on SageMaker.
BOOK: dict[str, Any] = {
    "model": preset("twinllama-3.1-8b"),
    "prompt_tokens": 1500,
    "output_tokens": 500,
    "max_input_tokens": 2048,
    "max_total_tokens": 4096,
}


def _plan(**kw: Any) -> Plan:
    return make_plan(PlanRequest(**kw))


@pytest.mark.parametrize("rps", [0.05, 0.5, 2.0, 8.0])
def test_book_case_never_picks_a_gpu_too_small_for_8b(rps: float) -> None:
    plan = _plan(**BOOK, requests_per_s=rps)
    chosen = get_instance(plan.instance.instance_type)
    assert chosen.gpu is not None and chosen.gpu.memory_gib >= 22  # a "24 GB" class GPU or larger
    assert not plan.instance.instance_type.startswith("ml.g4dn")
    assert plan.memory.need_gib <= plan.memory.usable_gib
    assert (plan.limits.max_input_tokens, plan.limits.max_total_tokens) == (2048, 4096)
    t4 = next(c for c in plan.candidates if c.instance_type == "ml.g4dn.xlarge")
    assert not t4.fits and "NVIDIA T4" in t4.note


def test_book_case_at_low_traffic_is_the_books_instance() -> None:
    plan = _plan(**BOOK, requests_per_s=0.2)
    assert plan.instance.instance_type == "ml.g5.2xlarge"
    assert plan.instance.num_gpus == 1 and plan.sagemaker_env["SM_NUM_GPUS"] == "1"
    assert plan.instance.usd_per_hour == pytest.approx(1.515)
    assert (
        plan.sagemaker_env["MAX_INPUT_TOKENS"] == "2048" and plan.sagemaker_env["MAX_TOTAL_TOKENS"] == "4096"
    )
    assert plan.deployment.type is DeploymentType.REAL_TIME
    assert [c.name for c in plan.deployment.criteria] == [
        "latency",
        "throughput",
        "data size",
        "infrastructure",
    ]


def test_pinning_a_t4_for_8b_explains_why_not() -> None:
    with pytest.raises(NoFitError, match=r"ml.g4dn.xlarge cannot serve .*NVIDIA T4"):
        _plan(**BOOK, requests_per_s=1, instance="ml.g4dn.xlarge")


def test_default_limits_are_powers_of_two_around_the_workload() -> None:
    plan = _plan(model=preset("llama-3.1-8b"), requests_per_s=1, prompt_tokens=1500, output_tokens=500)
    assert (plan.limits.max_input_tokens, plan.limits.max_total_tokens) == (2048, 4096)
    lim = plan.limits
    assert lim.max_input_tokens < lim.max_total_tokens <= lim.max_batch_total_tokens  # type: ignore[operator]
    assert lim.max_batch_prefill_tokens >= lim.max_input_tokens  # type: ignore[operator]


def test_more_traffic_needs_more_replicas_and_a_wider_autoscaling_range() -> None:
    low = _plan(**BOOK, requests_per_s=0.2, instance="ml.g5.2xlarge")
    high = _plan(**BOOK, requests_per_s=2.0, instance="ml.g5.2xlarge")
    assert high.instance.replicas > low.instance.replicas
    assert high.autoscaling is not None and high.autoscaling.max_replicas >= 2 * high.instance.replicas - 1
    assert high.autoscaling.metric == "concurrent_requests_per_replica"
    assert high.autoscaling.min_replicas == high.instance.replicas
    assert high.instance.usd_per_hour_total == pytest.approx(high.instance.replicas * 1.515)
    # capacity planned at 80%: the replicas carry the traffic with room to spare
    assert high.instance.replicas * high.speed.requests_per_s * 0.8 >= 2.0


def test_70b_needs_multi_gpu() -> None:
    plan = _plan(model=preset("llama-3.1-70b"), requests_per_s=1, prompt_tokens=1500, output_tokens=500)
    assert plan.instance.num_gpus >= 2 and plan.memory.devices == plan.instance.num_gpus
    assert plan.memory.weights_total_gib > 130 and plan.memory.weights_gib < plan.memory.device_memory_gib
    assert plan.sagemaker_env["SM_NUM_GPUS"] == str(plan.instance.num_gpus)


def test_default_small_model_runs_on_cpu() -> None:
    plan = _plan(model=preset("smollm2-135m"), model_ref="default", requests_per_s=1)
    assert get_instance(plan.instance.instance_type).gpu is None
    variant = plan.endpoint_config.variants[0]
    assert (variant.device, variant.model) == ("cpu", "default")
    assert variant.threads == get_instance(plan.instance.instance_type).vcpus // 2
    assert "SM_NUM_GPUS" not in plan.sagemaker_env


def test_clients_that_do_not_wait_get_async() -> None:
    plan = _plan(**BOOK, requests_per_s=1, clients_wait=False)
    assert plan.deployment.type is DeploymentType.ASYNC
    assert "do not wait" in plan.deployment.reason
    assert any("ApproximateBacklogSizePerInstance" in n for n in plan.notes)
    assert plan.autoscaling is not None and plan.autoscaling.metric == "backlog_per_replica"
    assert plan.autoscaling.min_replicas == 0  # idle: no replica runs
    cfg = plan.endpoint_config
    assert cfg.async_inference is not None and cfg.autoscaling == plan.autoscaling
    assert cfg.async_inference.max_concurrent_invocations_per_replica == plan.speed.concurrency


def test_requests_longer_than_the_realtime_timeout_go_async() -> None:
    plan = _plan(model=preset("llama-3.1-8b"), requests_per_s=0.1, prompt_tokens=1000, output_tokens=30000)
    assert plan.deployment.type is DeploymentType.ASYNC
    assert "60 s" in plan.deployment.reason


def test_offline_dataset_is_a_batch_transform() -> None:
    plan = _plan(**BOOK, dataset_rows=100_000)
    assert plan.deployment.type is DeploymentType.BATCH_TRANSFORM
    assert plan.autoscaling is None and plan.endpoint_config.autoscaling is None
    assert plan.batch is not None and plan.batch.tokens == 100_000 * 2000
    assert plan.batch.hours == pytest.approx(100_000 / plan.speed.requests_per_s / 3600)
    assert plan.batch.usd == pytest.approx(plan.batch.hours * plan.instance.usd_per_hour)
    fast = _plan(**BOOK, dataset_rows=100_000, deadline_hours=plan.batch.hours / 3)
    assert fast.batch is not None and fast.batch.instances >= 3 and fast.batch.hours <= plan.batch.hours / 3


def test_nf4_shrinks_8b_enough_for_a_t4() -> None:
    plan = _plan(**BOOK, requests_per_s=0.1, quantize="bitsandbytes-nf4", instance="ml.g4dn.xlarge")
    assert plan.memory.weights_gib < 6 and plan.memory.dtype == "float16"  # T4: no bf16
    assert plan.endpoint_config.variants[0].quantize == "bitsandbytes-nf4"
    assert plan.sagemaker_env["HF_MODEL_QUANTIZE"] == "bitsandbytes-nf4"


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_cpu_quantizations_are_planned_on_cpu_only(quantize: str) -> None:
    plan = _plan(model=preset("smollm2-135m"), requests_per_s=0.5, quantize=quantize)
    assert get_instance(plan.instance.instance_type).gpu is None
    gpu = [c for c in plan.candidates if get_instance(c.instance_type).gpu is not None]
    assert gpu and all(not c.fits and "bitsandbytes" in c.note for c in gpu)


def test_impossible_slo_names_every_instance() -> None:
    with pytest.raises(NoFitError) as info:
        _plan(**BOOK, requests_per_s=1, tpot_slo_ms=1)
    assert "ml.p5.48xlarge" in info.value.message and "--tpot-slo-ms" in info.value.message


def test_yaml_round_trips_through_endpoint_config(tmp_path: Path) -> None:
    plan = _plan(**BOOK, requests_per_s=2.0, endpoint_name="twin")
    text = plan_yaml(plan)
    assert text.startswith("# EndpointConfig written by `twinserve plan`")
    loaded = EndpointConfig.from_yaml(text)
    assert loaded == plan.endpoint_config
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    from_file = EndpointConfig.from_yaml(path)
    assert from_file.name == "twin" and from_file.variants[0].model == PLACEHOLDER_REF
    assert from_file.variants[0].limits.max_total_tokens == 4096
    # what `endpoint create twin --config plan.yaml` does with it
    assert EndpointConfig.from_dict(yaml.safe_load(path.read_text())) == plan.endpoint_config
    assert any("placeholder" in n for n in plan.notes)


# audit events that mean I/O or another process (https://docs.python.org/3/library/audit_events.html)
_IO_EVENTS = ("open", "os.", "socket.", "subprocess.", "shutil.", "glob.", "urllib.", "http.", "sqlite3.")
_io_seen: list[str] | None = None  # events recorded while a plan is made; None: not recording


def _record_io(event: str, args: tuple[Any, ...]) -> None:
    if _io_seen is not None and event.startswith(_IO_EVENTS):
        _io_seen.append(f"{event}{args!r:.200}")


def test_make_plan_is_pure() -> None:
    """make_plan promises no I/O and no clock (its module docstring): making a plan opens no file,
    socket or process, and the same request is the same plan, byte for byte in YAML."""
    global _io_seen
    sys.addaudithook(_record_io)  # hooks cannot be removed; this one records only inside the block
    _io_seen = []
    try:
        plans = [_plan(**BOOK, requests_per_s=2.0) for _ in range(2)]
        texts = [plan_yaml(p) for p in plans]
        seen = _io_seen
    finally:
        _io_seen = None
    assert seen == []
    assert plans[0] == plans[1] and texts[0] == texts[1]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"requests_per_s": None}, "requests_per_s"),
        ({"requests_per_s": 0}, "greater than 0"),
        ({"prompt_tokens": 0}, "greater than or equal to 1"),
        ({"prompt_tokens": 3000}, "exceeds max_input_tokens"),
        ({"output_tokens": 3000}, "exceeds max_total_tokens"),
        ({"max_total_tokens": 200_000}, "exceeds the model's context"),
        ({"dataset_rows": 10, "clients_wait": True}, "no client waits"),
        ({"deadline_hours": 2}, "offline batch"),
        ({"instance": "ml.x9.huge"}, "unknown instance type"),
        ({"endpoint_name": "Not A Label"}, "String should match pattern"),
        ({"dtype": "int4"}, "Input should be"),
        ({"unknown": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_requests_are_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(PydanticValidationError, match=message):
        PlanRequest(**{**BOOK, "requests_per_s": 1.0, **kw})


def test_dtype_aliases() -> None:
    assert PlanRequest(**BOOK, requests_per_s=1, dtype="BF16").dtype == "bfloat16"
    assert PlanRequest(**BOOK, requests_per_s=1, dtype="fp32").dtype == "float32"
