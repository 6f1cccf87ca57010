"""`twinserve generate`: stream a completion to the terminal (for people and smoke tests)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from twinserve.config import EngineConfig
from twinserve.errors import TwinserveError

if TYPE_CHECKING:
    from twinserve.engine.async_engine import AsyncEngine
    from twinserve.engine.request import GenerateRequest

err = Console(stderr=True)


def generate_command(
    prompt: str = typer.Argument(..., help="The prompt (or the user message with --chat)."),
    model: Path = typer.Option(..., "--model", "-m", help="Hugging Face layout folder (safetensors)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt with the model's chat template."),
    system: str | None = typer.Option(None, "--system", help="System message (with --chat)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float | None = typer.Option(None, "--temperature", help="Sample at this temperature."),
    top_p: float | None = typer.Option(None, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | bfloat16 | float16 | float32"),
    quantize: str | None = typer.Option(
        None, "--quantize", help="int8 | int4 | bitsandbytes | bitsandbytes-nf4"
    ),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
) -> None:
    """Generate a completion from a local model, streaming tokens as they are produced."""
    # the engine pulls in torch (~1 s): imported when this command runs, not for `--help`
    from twinserve.engine.async_engine import AsyncEngine
    from twinserve.engine.chat import chat_request
    from twinserve.engine.request import GenerateRequest, SamplingParams

    try:
        config = EngineConfig.model_validate(
            {"model": str(model), "dtype": dtype, "quantize": quantize, "num_threads": threads}
        )
        with err.status(f"loading {model} …"):
            engine = AsyncEngine.launch(config)
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            request = chat_request(engine.engine.tokenizer, messages, params)
        else:
            request = GenerateRequest(prompt=prompt, params=params)
        asyncio.run(_stream(engine, request))
    except TwinserveError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
    except ValueError as exc:  # pydantic validation of the options
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


async def _stream(engine: AsyncEngine, request: GenerateRequest) -> None:
    engine.start()
    start = time.monotonic()
    first: float | None = None
    tokens = 0
    try:
        async for event in engine.generate(request):
            if first is None:
                first = time.monotonic()
            tokens += event.token is not None
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if event.finished:
                reason = event.finish_reason.value if event.finish_reason else "?"
                elapsed = time.monotonic() - start
                decode = (tokens - 1) / (time.monotonic() - first) if tokens > 1 else 0.0
                sys.stdout.write("\n")
                err.print(
                    f"[dim]{tokens} tokens, finish={reason}, first token {1000 * (first - start):.0f} ms, "
                    f"{decode:.1f} tok/s decode, {elapsed:.2f} s total[/dim]"
                )
    finally:
        engine.shutdown()
