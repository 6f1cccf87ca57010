"""Request bodies and unary answers of the two wire formats, in and out of the client's types.

Parameters use TGI's names everywhere; `openai_params` renames them for OpenAI
(`max_new_tokens` → `max_tokens`, `do_sample=False` → `temperature=0`, `top_n_tokens`
→ `logprobs`, …). Names neither format knows go through unchanged (`ignore_eos`,
vendor extensions), so the server decides whether it accepts them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import ValidationError as PydanticValidationError

from twinserve.client._errors import malformed
from twinserve.client.transport import Response
from twinserve.client.types import FinishReason, GenerationResult, TokenInfo
from twinserve.server.protocol import openai as oai
from twinserve.server.protocol import tgi

OpenAIKind = Literal["chat", "completion"]
Messages = Sequence[Mapping[str, Any]]

TGI_GENERATE = "/generate"
TGI_STREAM = "/generate_stream"
OPENAI_CHAT = "/v1/chat/completions"
OPENAI_COMPLETION = "/v1/completions"
INVOCATIONS = "/invocations"
# the paths whose bodies SageMaker's single `/invocations` route takes ("/" is TGI's own root)
TGI_PATHS = (TGI_GENERATE, TGI_STREAM, "/")
INVOCATION_PATHS = frozenset({*TGI_PATHS, OPENAI_CHAT, OPENAI_COMPLETION, INVOCATIONS})

Reader = Callable[[Response, str | None], GenerationResult]

# TGI parameters with no OpenAI counterpart that are handled below, not passed through
_TGI_ONLY = {"details", "decoder_input_details", "do_sample", "top_n_tokens", "return_full_text"}


def merged(defaults: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Per-call params over the client's defaults. None means "not given": the default
    applies, or the server's own when there is none (so wrappers can pass optionals through)."""
    out = {**defaults, **{k: v for k, v in params.items() if v is not None}}
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------- requests
def tgi_body(prompt: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """`{"inputs", "parameters"}`; `details` defaults on (finish reason, counts, seed),
    as in TGI's own Python client."""
    return {"inputs": prompt, "parameters": {"details": True, **params}}


def openai_params(params: Mapping[str, Any], kind: OpenAIKind) -> dict[str, Any]:
    out = {k: v for k, v in params.items() if k not in _TGI_ONLY and k != "max_new_tokens"}
    if "max_new_tokens" in params:
        out["max_tokens"] = params["max_new_tokens"]
    do_sample = params.get("do_sample")
    if do_sample is not None and "temperature" not in out:
        # TGI is greedy unless asked; OpenAI samples at temperature 1 unless told 0
        out["temperature"] = 1.0 if do_sample else 0.0
    top_n = params.get("top_n_tokens")
    if top_n is not None:
        if kind == "chat":
            out.update(logprobs=True, top_logprobs=top_n)
        else:
            out["logprobs"] = top_n
    if kind == "completion" and params.get("return_full_text"):
        out["echo"] = True
    return out


def openai_body(
    kind: OpenAIKind,
    content: str | Messages,
    params: Mapping[str, Any],
    *,
    model: str | None,
    stream: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = openai_params(params, kind)
    if kind == "chat":
        body["messages"] = [dict(m) for m in content]  # type: ignore[arg-type]
    else:
        body["prompt"] = content
    if model is not None:
        body.setdefault("model", model)
    if stream:
        # usage in the last chunk gives exact token counts without counting chunks
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def invocations_body(path: str, payload: Mapping[str, Any], *, stream: bool) -> bytes:
    """The `/invocations` body (SageMaker's one route, where the body's shape picks the
    protocol) for a request built for `path`: the sync SageMaker calls and every async job."""
    if path not in INVOCATION_PATHS:
        raise ValueError(
            f"{path!r} has no /invocations equivalent: /invocations serves {sorted(INVOCATION_PATHS)}"
        )
    body = dict(payload)
    if path in TGI_PATHS and path != "/":
        parameters = dict(body.get("parameters") or {})
        parameters.setdefault("return_full_text", False)  # /generate's default, not /invocations'
        body["parameters"] = parameters
    if stream:
        body["stream"] = True
    else:
        body.pop("stream", None)
    return json.dumps(body).encode()


# ----------------------------------------------------------------- answers
def unwrapped(path: str, data: bytes) -> bytes:
    """TGI's answer on `/invocations` is `[{...}]`; `/generate`'s is `{...}`."""
    if path != TGI_GENERATE:
        return data
    try:
        parsed = json.loads(data)
    except ValueError:
        return data  # not JSON: the client reports it as malformed
    if isinstance(parsed, list) and len(parsed) == 1:
        return json.dumps(parsed[0]).encode()
    return data


def answer_path(data: bytes) -> str:
    """The route whose answer `data` is, told by its shape: for answers to requests the client
    did not build itself (an async job's own body, or its input at a location)."""
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise malformed("answer", exc) from exc
    if isinstance(parsed, list) or (isinstance(parsed, dict) and "generated_text" in parsed):
        return TGI_GENERATE
    kind = parsed.get("object") if isinstance(parsed, dict) else None
    if kind == "chat.completion":
        return OPENAI_CHAT
    if kind == "text_completion":
        return OPENAI_COMPLETION
    raise malformed("answer", ValueError("neither TGI's, a chat completion's nor a completion's"))


def reader(path: str) -> Reader:
    """How to read a unary answer of `path` into a `GenerationResult`."""
    if path == OPENAI_CHAT:
        return lambda response, rid: openai_result("chat", response, rid)
    if path == OPENAI_COMPLETION:
        return lambda response, rid: openai_result("completion", response, rid)
    return tgi_result


def tgi_result(response: Response, request_id: str | None) -> GenerationResult:
    try:
        parsed = tgi.GenerateResponse.model_validate_json(response.body)
    except PydanticValidationError as exc:
        raise malformed("TGI response", exc) from exc
    details = parsed.details
    prompt_tokens = int_header(response.headers, "x-prompt-tokens")
    if prompt_tokens is None and details is not None and details.prefill:
        prompt_tokens = len(details.prefill)
    generated = details.generated_tokens if details else int_header(response.headers, "x-generated-tokens")
    return GenerationResult(
        text=parsed.generated_text,
        finish_reason=FinishReason.parse(details.finish_reason.value) if details else None,
        prompt_tokens=prompt_tokens,
        generated_tokens=generated,
        seed=details.seed if details else None,
        request_id=request_id,
        tokens=tuple(
            TokenInfo(text=t.text, id=t.id, logprob=t.logprob, special=t.special)
            for t in (details.tokens if details else [])
        ),
    )


def openai_result(kind: OpenAIKind, response: Response, request_id: str | None) -> GenerationResult:
    usage: oai.Usage | None
    try:
        if kind == "chat":
            chat = oai.ChatCompletion.model_validate_json(response.body)
            choice = chat.choices[0]
            text, reason, usage = choice.message.content, choice.finish_reason, chat.usage
            tokens = _chat_tokens(choice.logprobs)
        else:
            completion = oai.Completion.model_validate_json(response.body)
            c_choice = completion.choices[0]
            text, reason, usage = c_choice.text, c_choice.finish_reason, completion.usage
            tokens = _completion_tokens(c_choice.logprobs)
    except (PydanticValidationError, IndexError) as exc:
        raise malformed(f"OpenAI {kind} response", exc) from exc
    return GenerationResult(
        text=text,
        finish_reason=FinishReason.parse(reason),
        prompt_tokens=usage.prompt_tokens if usage else None,
        generated_tokens=usage.completion_tokens if usage else None,
        request_id=request_id,
        tokens=tokens,
    )


def _chat_tokens(logprobs: oai.ChoiceLogprobs | None) -> tuple[TokenInfo, ...]:
    if logprobs is None or not logprobs.content:
        return ()
    return tuple(TokenInfo(text=t.token, logprob=t.logprob) for t in logprobs.content)


def _completion_tokens(logprobs: oai.CompletionLogprobs | None) -> tuple[TokenInfo, ...]:
    if logprobs is None:
        return ()
    return tuple(
        TokenInfo(text=text, logprob=lp)
        for text, lp in zip(logprobs.tokens, logprobs.token_logprobs, strict=False)
    )


def int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
