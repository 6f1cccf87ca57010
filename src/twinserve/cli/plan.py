"""`twinserve plan`: recommend a deployment for a model and its expected traffic (docs/plan.md).

Thin: reads the model's shape (config.json only, never the weights), builds a PlanRequest,
calls `planner.make_plan`, prints tables (or JSON) and writes the EndpointConfig YAML.
Exit codes: 0 ok; 1 the model could not be read, nothing in the catalog fits, or the YAML
could not be written; 2 bad flags or values.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from twinserve.cli.output import err, fail, out

if TYPE_CHECKING:
    from pydantic import ValidationError as PydanticValidationError

    from twinserve.planner.model_shape import ModelSource


DEFAULT_REQUESTS_PER_S = 1.0


def _describe(exc: PydanticValidationError) -> str:
    """One line per problem, named by field, without pydantic's URLs."""
    lines = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "request"
        lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def _source(
    model: str | None, preset_name: str | None, params: float | None
) -> tuple[ModelSource, list[str]]:
    """The model's shape from --model, --preset and/or --params; `default` when none is given."""
    from twinserve.errors import ClientError, TwinserveError
    from twinserve.planner.model_shape import ModelSource, from_params, preset, resolve_source

    if model is not None and (preset_name is not None or params is not None):
        fail("give --model, or --preset/--params, not both", 2)
    try:
        if params is not None:
            shape, note = from_params(params, like=preset_name)
            return ModelSource(shape=shape), [note] if note else []
        if preset_name is not None:
            return ModelSource(shape=preset(preset_name)), []
        return resolve_source(model or "default"), []
    except ClientError as exc:
        fail(exc.message, 2 if exc.status_code == 422 else 1)
    except TwinserveError as exc:
        fail(exc.message)


def _card_hints(source: ModelSource, given: dict[str, Any], prompt: int, output: int) -> list[str]:
    """Fill unset limits and quantization from the registry model card, when they fit the workload."""
    notes = []
    card_in, card_total = source.card_max_input_tokens, source.card_max_total_tokens
    if given["max_input_tokens"] is None and given["max_total_tokens"] is None and card_in and card_total:
        if prompt <= card_in < card_total and prompt + output <= card_total:
            given["max_input_tokens"], given["max_total_tokens"] = card_in, card_total
            notes.append(f"MAX_INPUT_TOKENS {card_in} / MAX_TOTAL_TOKENS {card_total} from the model card")
        else:
            notes.append(
                f"the model card's limits ({card_in}/{card_total}) cannot hold a {prompt}-token prompt and "
                f"{output} output tokens; sized from the workload instead"
            )
    if given["quantize"] is None and source.card_quantize is not None:
        given["quantize"] = source.card_quantize
        notes.append(f"quantization {source.card_quantize} from the model card")
    return notes


def plan_command(
    model: str | None = typer.Option(
        None, "--model", "-m", help="models:/name@alias, models:/name/N, a folder, a Hub id, or `default`."
    ),
    preset_name: str | None = typer.Option(
        None, "--preset", help="llama-3.1-8b (twinllama-3.1-8b), llama-3.1-70b, mistral-7b, smollm2-135m."
    ),
    params: float | None = typer.Option(
        None,
        "--params",
        help="Parameter count, e.g. 8e9; architecture from --preset, else the nearest preset.",
    ),
    dtype: str = typer.Option(
        "bf16", "--dtype", help="bf16 | fp16 | fp32 (or bfloat16 | float16 | float32)."
    ),
    quantize: str | None = typer.Option(
        None,
        "--quantize",
        help="int8 | int4 (CPU) | bitsandbytes | bitsandbytes-nf4 (GPU); default: the model card's.",
    ),
    requests_per_s: float | None = typer.Option(
        None,
        "--requests-per-s",
        "--rps",
        help=f"Expected average req/s (default {DEFAULT_REQUESTS_PER_S:g}).",
    ),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="Expected prompt length, tokens."),
    output_tokens: int = typer.Option(256, "--output-tokens", help="Expected generated tokens per request."),
    max_input_tokens: int | None = typer.Option(
        None, "--max-input-tokens", help="MAX_INPUT_TOKENS (default: next power of 2 ≥ prompt)."
    ),
    max_total_tokens: int | None = typer.Option(
        None, "--max-total-tokens", help="MAX_TOTAL_TOKENS (default: next power of 2 ≥ max input + output)."
    ),
    ttft_slo_ms: float = typer.Option(
        2000.0, "--ttft-slo-ms", help="Time-to-first-token SLO, ms (real-time)."
    ),
    tpot_slo_ms: float = typer.Option(
        100.0, "--tpot-slo-ms", help="Time-per-output-token SLO, ms (real-time)."
    ),
    clients_wait: bool | None = typer.Option(
        None, "--clients-wait/--no-clients-wait", help="Clients wait for the answer (default: yes)."
    ),
    dataset_rows: int | None = typer.Option(
        None, "--dataset-rows", help="Rows of a dataset processed offline (plans a batch transform)."
    ),
    deadline_h: float | None = typer.Option(
        None, "--deadline-h", help="Batch: finish within this many hours."
    ),
    peak_factor: float = typer.Option(
        2.0, "--peak-factor", help="Peak ÷ average traffic (sets max replicas)."
    ),
    instance: str | None = typer.Option(
        None, "--instance", help="Size for this instance type instead of choosing the cheapest."
    ),
    endpoint_name: str = typer.Option("llm-twin", "--endpoint-name", help="Endpoint name in the YAML."),
    yaml_path: Path | None = typer.Option(None, "--yaml", help="Write the EndpointConfig YAML to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole plan as JSON."),
) -> None:
    """Recommend deployment type, instance, TGI limits, replicas, cost and autoscaling."""
    from pydantic import ValidationError as PydanticValidationError

    from twinserve.errors import TwinserveError
    from twinserve.planner.plan import NoFitError, PlanRequest, make_plan
    from twinserve.planner.render import plan_yaml, print_plan

    source, notes = _source(model, preset_name, params)
    given: dict[str, Any] = {
        "max_input_tokens": max_input_tokens, "max_total_tokens": max_total_tokens, "quantize": quantize,
    }  # fmt: skip
    notes += _card_hints(source, given, prompt_tokens, output_tokens)
    if requests_per_s is None and dataset_rows is None:
        requests_per_s = DEFAULT_REQUESTS_PER_S
        notes.append(f"no --requests-per-s given: planned for {DEFAULT_REQUESTS_PER_S:g} req/s")
    try:
        request = PlanRequest(
            model=source.shape, model_ref=source.reference, input_notes=notes, dtype=dtype,
            requests_per_s=requests_per_s, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
            ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, clients_wait=clients_wait,
            dataset_rows=dataset_rows, deadline_hours=deadline_h, peak_factor=peak_factor,
            endpoint_name=endpoint_name, instance=instance, **given,
        )  # fmt: skip
        plan = make_plan(request)
    except PydanticValidationError as exc:
        fail(f"invalid plan request:\n{_describe(exc)}", 2)
    except NoFitError as exc:
        fail(exc.message)
    except TwinserveError as exc:
        fail(exc.message, 2 if exc.status_code == 422 else 1)
    if yaml_path is not None:
        try:
            yaml_path.write_text(plan_yaml(plan))
        except OSError as exc:
            fail(f"cannot write {yaml_path}: {exc.strerror or exc}")
    if as_json:
        typer.echo(plan.model_dump_json(indent=2))
    else:
        print_plan(plan, out)
    if yaml_path is not None:
        err.print(
            f"wrote {yaml_path}; create the endpoint with: "
            f"twinserve endpoint create {plan.endpoint_config.name} --config {yaml_path}",
            highlight=False,
            soft_wrap=True,
        )
