"""`twinserve serve`: the LLM microservice (TGI, OpenAI and SageMaker routes).

Every flag falls back to the environment, under TGI's and SageMaker's names too
(`HF_MODEL_ID`, `MAX_INPUT_LENGTH`, `HF_MODEL_QUANTIZE`, `SM_NUM_GPUS`, `PORT`, ...).
"""

from __future__ import annotations

from typing import Any

import typer
from pydantic import ValidationError as PydanticValidationError
from rich.console import Console

from twinserve.config import ServeConfig

err = Console(stderr=True)


def serve_command(
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Folder, Hub id (org/name, hf://org/name@rev) or `default`. Env: HF_MODEL_ID.",
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision. Env: HF_MODEL_REVISION."),
    host: str | None = typer.Option(None, "--host", help="Default 127.0.0.1 (0.0.0.0 inside SageMaker)."),
    port: int | None = typer.Option(None, "--port", help="Default 3000 (8080 inside SageMaker). Env: PORT."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto | bfloat16 | float16 | float32"),
    quantize: str | None = typer.Option(
        None,
        "--quantize",
        help="int8 | int4 | bitsandbytes | bitsandbytes-nf4. Env: HF_MODEL_QUANTIZE / QUANTIZE.",
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Require `Authorization: Bearer KEY` on generation routes. Env: API_KEY."
    ),
    num_threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
    max_input_tokens: int | None = typer.Option(None, "--max-input-tokens", help="Env: MAX_INPUT_TOKENS."),
    max_total_tokens: int | None = typer.Option(None, "--max-total-tokens", help="Env: MAX_TOTAL_TOKENS."),
    max_batch_prefill_tokens: int | None = typer.Option(None, "--max-batch-prefill-tokens"),
    max_batch_total_tokens: int | None = typer.Option(None, "--max-batch-total-tokens"),
    max_concurrent_requests: int | None = typer.Option(
        None,
        "--max-concurrent-requests",
        help="More in flight get 429 at once. Env: MAX_CONCURRENT_REQUESTS.",
    ),
    payload_limit: int | None = typer.Option(
        None, "--payload-limit", help="Largest body in bytes (413 above)."
    ),
    drain_timeout: float | None = typer.Option(
        None, "--drain-timeout", help="Seconds to finish requests on SIGTERM."
    ),
    drain_grace: float | None = typer.Option(
        None,
        "--drain-grace",
        help="Seconds the port keeps answering after SIGTERM (/health 503) before it closes.",
    ),
    log_format: str | None = typer.Option(None, "--log-format", help="json | text"),
    log_prompts: bool | None = typer.Option(
        None, "--log-prompts/--no-log-prompts", help="Log prompt and output text."
    ),
    prefix_cache: bool | None = typer.Option(
        None,
        "--prefix-cache/--no-prefix-cache",
        help="Reuse earlier prompts' KV for prompts that start the same way (default on). Env: PREFIX_CACHING.",
    ),
    speculate: int | None = typer.Option(
        None,
        "--speculate",
        help="Draft up to N tokens per step from the prompt and answer so far (prompt lookup), "
        "verified in one pass; greedy requests only, output unchanged (default 0, off). Env: SPECULATE.",
    ),
) -> None:
    """Serve a model over HTTP until SIGTERM (then drain in-flight requests and exit 0)."""
    flags: dict[str, Any] = {
        "model": model,
        "revision": revision,
        "host": host,
        "port": port,
        "dtype": dtype,
        "quantize": quantize,
        "api_key": api_key,
        "num_threads": num_threads,
        "max_input_tokens": max_input_tokens,
        "max_total_tokens": max_total_tokens,
        "max_batch_prefill_tokens": max_batch_prefill_tokens,
        "max_batch_total_tokens": max_batch_total_tokens,
        "max_concurrent_requests": max_concurrent_requests,
        "payload_limit": payload_limit,
        "drain_timeout_s": drain_timeout,
        "drain_grace_s": drain_grace,
        "log_format": log_format,
        "log_prompts": log_prompts,
        "prefix_cache": prefix_cache,
        "speculate": speculate,
    }
    try:
        config = ServeConfig(**{k: v for k, v in flags.items() if v is not None})
        # fail before binding the port when the limits don't fit together
        config.engine_config(config.model)
    except (PydanticValidationError, ValueError) as exc:
        err.print(f"[red]error:[/red] invalid configuration: {exc}")
        raise typer.Exit(2) from exc
    from twinserve.server.run import serve

    serve(config)


# Replicas start through this app, not the whole CLI: importing every command module (the
# benchmarks, the registry, RAG) costs ~0.5 s of each replica's start for a command it never runs.
replica_app = typer.Typer(add_completion=False)
replica_app.command("serve")(serve_command)


@replica_app.callback()
def _replica_root() -> None:
    """`serve` stays a subcommand, so a replica's command line reads `… serve --model …`."""
