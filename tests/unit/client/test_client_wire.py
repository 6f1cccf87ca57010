"""The client's parsing of wire bytes: SSE payloads and error bodies, hand-written with the
server's own protocol schemas, fed straight to the parsers and error mappers (no transport).

How the client behaves when a real server fails mid-stream (which errors it raises, what it
retries) is tested against one in test_client_midstream.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from twinserve.client._errors import error_from_event, error_from_response
from twinserve.client._retry import RetryPolicy, retry_after
from twinserve.client._stream import OpenAIStreamParser, TgiStreamParser
from twinserve.client._wire import merged, openai_params
from twinserve.client.types import FinishReason
from twinserve.errors import (
    ClientError,
    EngineDeadError,
    ModelError,
    NotReadyError,
    OverloadedError,
    ServerError,
    ValidationError,
)
from twinserve.server.protocol import openai as oai
from twinserve.server.protocol import tgi


def tgi_event(i: int, text: str, *, final: str | None = None, special: bool = False) -> str:
    details = (
        tgi.StreamDetails(finish_reason="length", generated_tokens=i, seed=None, input_length=3)
        if final is not None
        else None
    )
    event = tgi.StreamResponse(
        index=i,
        token=tgi.TokenOut(id=10 + i, text=text, logprob=-0.5, special=special),
        generated_text=final,
        details=details,
    )
    return event.model_dump_json()


def tgi_error(message: str, error_type: str) -> str:
    return tgi.ErrorResponse(error=message, error_type=error_type).model_dump_json()


def openai_error(message: str, type_: str, code: int) -> str:
    return oai.ErrorResponse(error=oai.ErrorBody(message=message, type=type_, code=code)).model_dump_json()


def chat_chunk(content: str | None, reason: str | None = None, *, role: bool = False) -> str:
    delta = oai.DeltaMessage(role="assistant" if role else None, content=content)
    return oai.ChatCompletionChunk(
        id="c", created=0, model="m", choices=[oai.ChatChunkChoice(delta=delta, finish_reason=reason)]
    ).model_dump_json()


def usage_chunk(prompt: int, completion: int) -> str:
    usage = oai.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    return oai.ChatCompletionChunk(id="c", created=0, model="m", choices=[], usage=usage).model_dump_json()


# ------------------------------------------------------------------ parsers
def test_tgi_parser_final_chunk_and_special_tokens() -> None:
    parser = TgiStreamParser("rid")
    first = parser.feed(tgi_event(1, "he"))
    special = parser.feed(tgi_event(2, "</s>", special=True))  # text of a special token is not text
    last = parser.feed(tgi_event(3, "llo", final="hello"))
    assert first is not None and special is not None and last is not None
    assert (first.text, special.text, last.text) == ("he", "", "llo")
    assert last.finished and not first.finished
    assert (last.generated_tokens, last.prompt_tokens, last.finish_reason) == (3, 3, FinishReason.LENGTH)
    assert first.token_id == 11 and first.logprob == -0.5 and first.request_id == "rid"
    assert parser.end() is None


def test_tgi_parser_final_text_comes_from_generated_text() -> None:
    # a server may flush held-back text with the (special) EOS token: generated_text decides
    parser = TgiStreamParser(None)
    parser.feed(tgi_event(1, "ab"))
    last = parser.feed(tgi_event(2, "c", final="abc", special=True))
    assert last is not None and last.text == "c"


def test_openai_parser_holds_final_chunk_for_usage() -> None:
    parser = OpenAIStreamParser("chat", "rid")
    assert parser.feed(chat_chunk("", role=True)) is None  # the opening role delta
    a = parser.feed(chat_chunk("he"))
    assert parser.feed(chat_chunk("llo", "length")) is None  # held
    last = parser.feed(usage_chunk(4, 2))
    assert a is not None and last is not None
    assert last.finished and last.text == "llo" and last.generated_text == "hello"
    assert (last.prompt_tokens, last.generated_tokens, last.finish_reason) == (4, 2, FinishReason.LENGTH)
    assert parser.feed("[DONE]") is None


def test_openai_parser_without_usage_finishes_at_done() -> None:
    parser = OpenAIStreamParser("chat", None)
    parser.feed(chat_chunk("x", "stop"))
    last = parser.feed("[DONE]")
    assert last is not None and last.finished and last.finish_reason is FinishReason.STOP
    assert last.generated_tokens is None


@pytest.mark.parametrize("parser", [TgiStreamParser(None), OpenAIStreamParser("completion", None)])
def test_stream_cut_short_is_an_error(parser: Any) -> None:
    with pytest.raises(ServerError, match="ended before"):
        parser.end()


@pytest.mark.parametrize(
    ("payload", "cls"),
    [
        (tgi_error("boom", "generation"), ModelError),
        (tgi_error("engine is dead", "unhealthy"), EngineDeadError),
        (tgi_error("full", "overloaded"), OverloadedError),
        (openai_error("boom", "server_error", 424), ModelError),
        (openai_error("dead", "service_unavailable", 503), EngineDeadError),
        (openai_error("bad", "invalid_request_error", 422), ValidationError),
    ],
)
def test_error_event_raises_typed_error(payload: str, cls: type[Exception]) -> None:
    parser = TgiStreamParser("rid") if '"error_type"' in payload else OpenAIStreamParser("chat", "rid")
    with pytest.raises(cls) as info:
        parser.feed(payload)
    assert type(info.value) is cls
    assert info.value.__notes__ == ["request_id: rid"]


# ------------------------------------------------------------------ errors
def test_error_from_response_status_decides_and_body_gives_message() -> None:
    error = error_from_response(503, b'{"error": "the model is still loading", "error_type": "not_ready"}')
    assert type(error) is NotReadyError and error.message == "the model is still loading"
    error = error_from_response(503, b'{"error": "engine is dead: boom", "error_type": "unhealthy"}')
    assert type(error) is EngineDeadError
    error = error_from_response(400, b'{"error": {"message": "bad", "type": "invalid_request_error"}}')
    assert type(error) is ValidationError and error.status_code == 400 and error.message == "bad"
    error = error_from_response(502, b"<html>Bad Gateway</html>")
    assert type(error) is ServerError and error.status_code == 502 and "Bad Gateway" in error.message
    error = error_from_response(418, b"")
    assert type(error) is ClientError and error.status_code == 418 and error.message == "HTTP 418"
    assert error_from_event({"index": 1}) is None


# ------------------------------------------------------------------ params
def test_openai_params_translation() -> None:
    params = merged(
        {"max_new_tokens": 8, "temperature": None},
        {"stop": "x", "do_sample": False, "top_n_tokens": 2, "details": True, "ignore_eos": True},
    )
    assert openai_params(params, "chat") == {
        "max_tokens": 8,
        "stop": ["x"],
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 2,
        "ignore_eos": True,
    }
    completion = openai_params({"do_sample": True, "top_n_tokens": 1, "return_full_text": True}, "completion")
    assert completion == {"temperature": 1.0, "logprobs": 1, "echo": True}
    assert openai_params({"do_sample": True, "temperature": 0.5}, "chat") == {"temperature": 0.5}


def test_retry_policy() -> None:
    policy = RetryPolicy(max_retries=2, backoff_base=1.0, backoff_cap=3.0)
    assert policy.should_retry(OverloadedError("x"), 0)
    assert policy.should_retry(NotReadyError("x"), 1)
    assert not policy.should_retry(OverloadedError("x"), 2)
    assert not policy.should_retry(ValidationError("x"), 0)
    assert not policy.should_retry(ModelError("x"), 0)
    for attempt in range(6):
        assert 0.0 <= policy.delay(attempt) <= 3.0
        assert policy.delay(attempt, retry_after=2.0) >= 2.0
        assert policy.delay(attempt, retry_after=60.0) == 3.0
    assert retry_after({"retry-after": "1.5"}) == 1.5
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after({}) is None
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
