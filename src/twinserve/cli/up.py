"""`twinserve up`: the mission end to end on the embedded defaults (what `make up` runs).

registry (import the default model as llm-twin v1 @champion, once) → endpoint `twin` from
`models:/llm-twin@champion`, autoscaling 1..2 replicas, real-time and async (`/async-invocations`)
→ one streamed answer through the endpoint's router → one async job, queued, run and stored →
the project's docs/ ingested and the RAG service started in front of `twin`, asked one question
(answer with sources) → the URLs and paste-able commands → serve until Ctrl-C, SIGTERM or SIGHUP (autoscaling events
printed as they happen) → delete the endpoint, leaving no process behind, even when stdout and
stderr are gone (a `| tee` that died with the terminal).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from twinserve.cli.chat import CHAMPION_REF, DEMO_QUESTION, stream_chat
from twinserve.cli.up_rag import rag_usage

if TYPE_CHECKING:
    from twinserve.cli.up_rag import RagProcess
    from twinserve.client import LLMClient
    from twinserve.platforms.local.platform import LocalPlatform

out = Console()
err = Console(stderr=True)


def up_command(
    name: str = typer.Option("twin", "--name", help="Endpoint name."),
    model: str = typer.Option(CHAMPION_REF, "--model", "-m", help="Registry reference or model folder."),
    question: str = typer.Option(DEMO_QUESTION, "--question", help="What to ask once it is up."),
    max_replicas: int = typer.Option(2, "--max-replicas", min=1, help="Autoscaling upper bound."),
    target_concurrency: float = typer.Option(
        4.0, "--target-concurrency", min=0.1, help="Concurrent requests per replica autoscaling keeps."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    hold: float | None = typer.Option(
        None, "--hold", min=0, help="Serve this many seconds, then delete (default: until Ctrl-C)."
    ),
    rag: bool = typer.Option(
        True, "--rag/--no-rag", help="Also run the RAG service in front of the endpoint."
    ),
    docs: Path | None = typer.Option(
        None, "--docs", help="What the RAG service answers from (default: this project's docs/)."
    ),
) -> None:
    """Deploy llm-twin@champion as endpoint `twin` (autoscaling 1..2), ask it once, serve until Ctrl-C."""
    from twinserve.errors import TwinserveError
    from twinserve.platforms.local.platform import LocalPlatform

    manager = LocalPlatform()
    services: list[RagProcess] = []
    failure: Exception | None = None
    with _StopSignals() as stop:  # Ctrl-C, SIGTERM and SIGHUP all end it the same way
        try:
            _run(
                manager,
                name,
                model,
                question,
                max_replicas,
                target_concurrency,
                max_new_tokens,
                hold,
                services if rag else None,
                docs,
            )
        except KeyboardInterrupt:
            _say("\n[dim]interrupted[/dim]")
        except TwinserveError as exc:
            failure = exc
            _say(f"[red]error:[/red] {exc.message}")
        except OSError as exc:  # the terminal or the pipe it printed to went away (`| tee`, closed window)
            failure = exc
        finally:
            # whatever happened above, printing included: no endpoint and no process is left behind
            stop.ignore_more()
            for service in services:  # the RAG service calls the endpoint: it goes first
                service.stop()
            _delete(manager, name)
    if failure is not None:
        raise typer.Exit(1) from failure


def _run(
    manager: LocalPlatform,
    name: str,
    model: str,
    question: str,
    max_replicas: int,
    target_concurrency: float,
    max_new_tokens: int,
    hold: float | None,
    services: list[RagProcess] | None,
    docs: Path | None,
) -> None:
    from twinserve.client import LLMClient
    from twinserve.deploy.spec import EndpointConfig

    if model == CHAMPION_REF:
        from twinserve.registry.store import ModelRegistry

        with err.status("registering the default model as llm-twin (once) …"):
            ModelRegistry().import_default()
    if manager.delete(name):  # left over from a run that was killed: start clean
        err.print(f"[dim]deleted a previous endpoint {name!r}[/dim]")
    config = EndpointConfig.model_validate(
        {
            "name": name,
            "variants": [{"model": model, "replicas": 1, "threads": _threads_per_replica(max_replicas)}],
            "async": {"max_concurrent_invocations_per_replica": 8},
            "autoscaling": {
                "type": "target_tracking",
                "target": target_concurrency,
                "min_replicas": 1,
                "max_replicas": max_replicas,
                "lookback_s": 30,
                "scale_out_cooldown_s": 30,
                "scale_in_cooldown_s": 120,
            },
        }
    )
    with err.status(f"creating endpoint {name!r} …") as status:

        def progress(message: str) -> None:
            err.print(f"[dim]{message}[/dim]", highlight=False)
            status.update(message)

        endpoint = manager.create(config, progress=progress)
    assert endpoint.url is not None
    version = endpoint.replicas[0].model_version if endpoint.replicas else None
    err.print(f"[green]endpoint {name!r} is InService[/green] ({version or model}) at {endpoint.url}")
    err.print(f"[bold]user:[/bold] {question}")
    with LLMClient(endpoint.url, api="openai") as client:
        stream_chat(client, [{"role": "user", "content": question}], max_new_tokens=max_new_tokens)
        _one_async_job(client, question, max_new_tokens)
    rag_url = _rag(name, manager, services, max_new_tokens, docs) if services is not None else None
    out.print(_usage(name, endpoint.url, manager.runtime_api_url(), rag_url), highlight=False, soft_wrap=True)
    _serve(manager, name, hold)


def _say(message: str) -> None:
    """Print on stderr if it is still there: cleanup must not depend on being able to print."""
    with contextlib.suppress(OSError):
        err.print(message, highlight=False)


def _one_async_job(client: LLMClient, question: str, max_new_tokens: int) -> None:
    """The same question as an async job: queued (202), run by the workers, stored, read back."""
    with err.status("queueing the same question as an async job …"):
        job = client.submit_async(
            messages=[{"role": "user", "content": question}], max_new_tokens=max_new_tokens
        )
        answer = job.result(timeout=600)
    err.print(
        f"[bold]async job[/bold] {job.inference_id}: succeeded, {answer.generated_tokens} tokens stored at "
        f"{job.output_location}",
        highlight=False,
        soft_wrap=True,
    )


def _rag(
    name: str, manager: LocalPlatform, services: list[RagProcess], max_new_tokens: int, docs: Path | None
) -> str | None:
    """Ingest docs/, start the RAG service in front of the endpoint, ask it once; its URL."""
    from twinserve.cli.rag import print_sources
    from twinserve.cli.up_rag import RAG_QUESTION, RagProcess, ingest_docs, project_docs
    from twinserve.rag.ask import ask

    docs = docs or project_docs()
    if docs is None:
        err.print("[dim]no docs/ folder here: the RAG service is not started[/dim]")
        return None
    with err.status(f"ingesting {docs} into the RAG collection …"):
        summary = ingest_docs(docs, err)
    err.print(f"[green]ingested[/green] {docs}: {summary}", highlight=False)
    rag = RagProcess(name, manager.home / "rag" / "up-rag.log")
    services.append(rag)
    with err.status("starting the RAG service in front of the endpoint …"):
        rag.start()
    err.print(f"[green]RAG service is up[/green] at {rag.url}")
    err.print(f"[bold]user (RAG):[/bold] {RAG_QUESTION}")

    def token(text: str) -> None:
        out.print(text, end="", highlight=False, soft_wrap=True)

    answer = ask(rag.url, {"query": RAG_QUESTION, "k": 4, "max_new_tokens": max_new_tokens}, on_token=token)
    out.print()
    print_sources(answer["sources"])
    return rag.url


def _threads_per_replica(max_replicas: int) -> int:
    """Cores split between the most replicas autoscaling may run: they never fight for a core."""
    return max(1, (os.cpu_count() or 1) // max_replicas)


def _usage(name: str, url: str, runtime_api: str | None = None, rag_url: str | None = None) -> str:
    tgi = {"inputs": "What is an LLM twin?", "parameters": {"max_new_tokens": 64}}
    chat = {
        "messages": [{"role": "user", "content": "What is an LLM twin?"}],
        "max_tokens": 64,
        "stream": True,
    }

    def curl(path: str, body: Mapping[str, object], stream: bool = False) -> str:
        flag = "-N " if stream else ""
        return (
            f"curl {flag}{url}{path} -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"
        )

    return "\n".join(
        [
            "",
            f"[bold]endpoint {name}[/bold]: {url}  (TGI, OpenAI and SageMaker routes; 127.0.0.1 only)",
            "  TGI:    " + curl("/generate", tgi),
            "  OpenAI: " + curl("/v1/chat/completions", chat, stream=True),
            *(
                [
                    f'  boto3:  boto3.client("sagemaker-runtime", endpoint_url="{runtime_api}")'
                    f'.invoke_endpoint(EndpointName="{name}", ContentType="application/json", Body=...)'
                ]
                if runtime_api
                else []
            ),
            "  async:  "
            + curl("/async-invocations", {k: v for k, v in chat.items() if k != "stream"})
            + "   then: twinserve jobs result ID --wait   (docs/async.md)",
            "  batch:  twinserve batch create JOB --model models:/llm-twin@champion --input FILE.jsonl "
            "--output DIR   (offline, in-process; docs/batch.md)",
            f"  status: twinserve endpoint describe {name}    load test: twinserve bench serve --url {url} "
            "--api openai --chat --concurrency 16",
            *(rag_usage(rag_url) if rag_url else []),
            "serving until Ctrl-C (then the endpoint is deleted)",
        ]
    )


def _serve(manager: LocalPlatform, name: str, hold: float | None) -> None:
    """Wait for Ctrl-C (or `hold` seconds), printing scaling events as they are recorded."""
    stop = threading.Event()
    seen = len(manager.events(name, limit=None))
    waited = 0.0
    while not stop.wait(1.0):
        waited += 1.0
        events = manager.events(name, limit=None)
        for event in events[seen:]:
            err.print(
                f"[cyan]autoscaling[/cyan] {event.variant}: {event.from_replicas} → {event.to_replicas} "
                f"({event.reason})",
                highlight=False,
            )
        seen = len(events)
        if hold is not None and waited >= hold:
            return


def _delete(manager: LocalPlatform, name: str) -> None:
    _say(f"[dim]deleting endpoint {name!r} …[/dim]")
    if manager.delete(name):
        _say(f"endpoint {name!r} deleted; no process left")


class _StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (`kill`, a CI timeout) and SIGHUP (the terminal closed) raise
    KeyboardInterrupt once; after that, or after `ignore_more`, they are ignored, so a second
    one cannot cut the endpoint's deletion short."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._raised = False
        self._previous: dict[int, Any] = {}

    def _handle(self, _sig: int, _frame: FrameType | None) -> None:
        if not self._raised:
            self._raised = True
            raise KeyboardInterrupt

    def ignore_more(self) -> None:
        self._raised = True

    def __enter__(self) -> _StopSignals:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
