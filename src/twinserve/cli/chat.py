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
CHAMPION_REF = "models:/llm-twin@champion"


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
    model: str = typer.Option(
        CHAMPION_REF, "--model", "-m", help="Registry reference, model folder, Hub id or `default`."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
) -> None:
    """Serve the model (by default the registry's llm-twin@champion), stream one chat answer, stop.

    The answer travels the whole stack: registry → `twinserve serve` (a child process) →
    OpenAI chat route → `LLMClient`. An empty registry gets the default model as llm-twin v1.
    """
    import httpx

    from twinserve.config import get_settings
    from twinserve.server.process import ServerProcess

    try:
        if model == CHAMPION_REF:
            from twinserve.registry.store import ModelRegistry

            with err.status("registering the default model as llm-twin (once) …"):
                ModelRegistry().import_default()
        elif model == "default":
            from twinserve.registry.default_model import ensure_default_model

            ensure_default_model()  # with its progress display, before the server needs it
        logs = get_settings().home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # the server resolves (and verifies) the reference itself; /info says what it serves
        server = ServerProcess(["--model", model, "--log-format", "text"], log_path=logs / "demo-serve.log")
        with server:
            with err.status(f"starting twinserve serve --model {model} …"):
                server.wait_healthy()
            info = httpx.get(f"{server.url}/info", timeout=10).json()
            version = f" v{info['registry_version']}" if info.get("registry_version") else ""
            err.print(
                f"[green]serving[/green] {info['model_id']}{version} (weights sha256 "
                f"{info['weights_sha256'][:12]}) at {server.url}: TGI /generate, OpenAI "
                f"/v1/chat/completions, SageMaker /invocations (log: {server.log_path})"
            )
            err.print(f"[bold]user:[/bold] {question}")
            with LLMClient(server.url, api="openai") as client:
                stream_chat(client, [{"role": "user", "content": question}], max_new_tokens=max_new_tokens)
        err.print(f"[dim]server stopped (exit {server.proc.returncode})[/dim]")
    except TwinserveError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
