"""`twinserve chat` (ask a running endpoint) and `twinserve demo` (serve the default model, ask it).

Both talk HTTP through `LLMClient`, the same client every other caller uses.
"""

from __future__ import annotations

import sys
import time

import typer
from rich.console import Console

from twinserve.client import LLMClient
from twinserve.errors import TwinserveError

err = Console(stderr=True)

DEMO_QUESTION = "Tell me in two sentences what an LLM twin is."


def chat_command(
    message: str = typer.Argument(..., help="The user message."),
    url: str = typer.Option("http://127.0.0.1:3000", "--url", help="Endpoint base URL."),
    system: str | None = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float | None = typer.Option(None, "--temperature", help="Sample at this temperature."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="TWINSERVE_API_KEY", help="Bearer key."),
) -> None:
    """Stream one chat answer from a running endpoint (ours, TGI or vLLM)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": message}
    ]
    try:
        with LLMClient(url, api="openai", api_key=api_key) as client:
            stream_chat(client, messages, max_new_tokens=max_new_tokens, temperature=temperature)
    except TwinserveError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from exc


def stream_chat(client: LLMClient, messages: list[dict[str, str]], **params: object) -> None:
    """Print the answer as it streams, then one line of timings."""
    start = time.monotonic()
    first: float | None = None
    last = None
    for chunk in client.chat_stream(messages, **params):
        if first is None and chunk.text:
            first = time.monotonic()
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    elapsed = time.monotonic() - start
    tokens = last.generated_tokens if last is not None and last.generated_tokens else 0
    ttft = f"{1000 * (first - start):.0f} ms" if first is not None else "-"
    reason = last.finish_reason.value if last is not None and last.finish_reason else "?"
    err.print(f"[dim]{tokens} tokens, finish={reason}, first token {ttft}, {elapsed:.2f} s total[/dim]")


def demo_command(
    question: str = typer.Argument(DEMO_QUESTION, help="What to ask."),
    model: str = typer.Option("default", "--model", "-m", help="Model folder, Hub id or `default`."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
) -> None:
    """Start `twinserve serve` on the model, stream one chat answer through its OpenAI route, stop it."""
    from twinserve.config import get_settings
    from twinserve.registry.resolve import resolve_model
    from twinserve.server.process import ServerProcess

    try:
        resolved = resolve_model(model, progress=True)
        logs = get_settings().home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        server = ServerProcess(
            ["--model", str(resolved.path), "--log-format", "text"], log_path=logs / "demo-serve.log"
        )
        with server:
            with err.status(f"starting twinserve serve on {resolved.model_id} …"):
                server.wait_healthy()
            err.print(
                f"[green]serving[/green] {resolved.model_id} at {server.url} "
                f"(TGI /generate, OpenAI /v1/chat/completions, SageMaker /invocations; log: {server.log_path})"
            )
            err.print(f"[bold]user:[/bold] {question}")
            with LLMClient(server.url, api="openai") as client:
                stream_chat(client, [{"role": "user", "content": question}], max_new_tokens=max_new_tokens)
        err.print(f"[dim]server stopped (exit {server.proc.returncode})[/dim]")
    except TwinserveError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
