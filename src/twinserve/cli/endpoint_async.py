"""The async side of `twinserve endpoint`: the `--async` flags of `create` and `invoke-async`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from twinserve.cli.output import err, fail, out


def async_block(enabled: bool, **fields: Any) -> dict[str, Any] | None:
    """The `async:` mapping that `create --async` and its flags mean; None without `--async`."""
    given = {k: v for k, v in fields.items() if v is not None}
    if not enabled:
        if given:
            flag = next(iter(given)).removesuffix("_url").removesuffix("_arn").replace("_", "-")
            fail(f"--{flag} is an --async flag; add --async", 2)
        return None
    if "max_concurrent_invocations" in given:
        given["max_concurrent_invocations_per_replica"] = given.pop("max_concurrent_invocations")
    return given


def invoke_async_command(
    name: str = typer.Argument(..., help="Async endpoint name."),
    prompt: str | None = typer.Argument(None, help="The user message (a chat body)."),
    input_file: Path | None = typer.Option(
        None, "--input", "-i", help="A JSON body as /invocations takes it (TGI, chat or prompt), sent inline."
    ),
    input_location: str | None = typer.Option(
        None, "--input-location", help="file:///… or s3://… where such a body already is."
    ),
    inference_id: str | None = typer.Option(None, "--inference-id", help="Default: a new id."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="With PROMPT."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the answer and print it."),
    timeout: float = typer.Option(600.0, "--timeout", min=0, help="With --wait: give up after this (s)."),
) -> None:
    """Queue a request on an async endpoint; print its inference id and where its answer will be."""
    from twinserve.cli.endpoint import _describe, _platform
    from twinserve.client import LLMClient
    from twinserve.errors import TwinserveError

    given = [g for g in (prompt, input_file, input_location) if g is not None]
    if len(given) != 1:
        fail("give one of PROMPT, --input FILE and --input-location URL", 2)
    body: dict[str, Any] | None = None
    if input_file is not None:
        try:
            body = json.loads(input_file.read_text())
        except (OSError, ValueError) as exc:
            fail(f"--input {input_file}: {exc}", 2)
        if not isinstance(body, dict):
            fail(f"--input {input_file}: a body is a JSON object (inputs, messages or prompt)", 2)
    platform = _platform(name)
    ep = _describe(platform, name)
    if ep.config.async_inference is None:
        fail(f"endpoint {name!r} is real-time only; use `twinserve endpoint invoke`", 2)
    try:
        with LLMClient(transport=platform.transport(ep), api="openai") as client:
            if prompt is not None:
                messages = [{"role": "user", "content": prompt}]
                job = client.submit_async(
                    messages=messages, inference_id=inference_id, max_new_tokens=max_new_tokens
                )
            else:
                job = client.submit_async(body=body, input_location=input_location, inference_id=inference_id)
            err.print(
                f"queued {job.inference_id}: answer at {job.output_location}", highlight=False, soft_wrap=True
            )
            if not wait:
                out.print(job.inference_id)
                return
            with err.status(f"waiting for {job.inference_id}"):
                answer = job.result(timeout=timeout)
            typer.echo(answer.text)
    except TimeoutError as exc:
        fail(str(exc))
    except TwinserveError as exc:
        fail(exc.message)
