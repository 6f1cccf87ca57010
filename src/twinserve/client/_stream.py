"""SSE payloads of either wire format into `StreamChunk`s, one event at a time.

A parser is fed each `data:` string and returns the chunk to hand to the caller, if any;
an error event raises the typed error. Both make sure the last chunk is the only one
with `finished=True` and carries the server's counts:
- TGI: the last event has `generated_text` and `details`. The text of earlier special
  tokens (EOS with `ignore_eos`) is dropped, as TGI's own clients do, and the last
  chunk's text is whatever `generated_text` holds beyond what was already sent.
- OpenAI: the chunk with `finish_reason` is held until the usage chunk (we always ask
  for `stream_options.include_usage`) or `[DONE]`, then sent once, with the usage.
  Chunks with neither text nor a token (the opening `role` delta) are not sent.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Protocol

from pydantic import ValidationError as PydanticValidationError

from twinserve.client._errors import error_from_event, malformed
from twinserve.client._wire import OpenAIKind
from twinserve.client.types import FinishReason, StreamChunk
from twinserve.errors import ServerError
from twinserve.server.protocol import openai as oai
from twinserve.server.protocol import tgi

DONE = "[DONE]"


class StreamParser(Protocol):
    finished: bool

    def feed(self, data: str) -> StreamChunk | None: ...

    def end(self) -> StreamChunk | None:
        """The event stream is over: the held final chunk, or an error if none came."""
        ...


def _payload(data: str, request_id: str | None) -> Any:
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise malformed("stream event", exc) from exc
    error = error_from_event(payload, request_id)
    if error is not None:
        raise error
    return payload


def _cut_short(request_id: str | None) -> ServerError:
    error = ServerError("the stream ended before its last event (server gone or connection cut)")
    error.status_code = 502
    if request_id:
        error.add_note(f"request_id: {request_id}")
    return error


class TgiStreamParser:
    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id
        self.finished = False
        self._index = 0
        self._sent: list[str] = []

    def feed(self, data: str) -> StreamChunk | None:
        if self.finished or not data.strip():
            return None
        try:
            event = tgi.StreamResponse.model_validate(_payload(data, self.request_id))
        except PydanticValidationError as exc:
            raise malformed("TGI stream event", exc) from exc
        token = event.token
        text = "" if token.special else token.text
        if event.generated_text is not None:
            text = self._rest_of(event.generated_text, text)
        chunk = StreamChunk(
            text=text,
            index=self._index,
            token_id=token.id if token.id >= 0 else None,
            logprob=token.logprob,
            special=token.special,
            request_id=self.request_id,
        )
        self._index += 1
        self._sent.append(text)
        if event.generated_text is None:
            return chunk
        self.finished = True
        details = event.details
        return replace(
            chunk,
            finished=True,
            generated_text=event.generated_text,
            finish_reason=FinishReason.parse(details.finish_reason.value) if details else None,
            prompt_tokens=details.input_length if details else None,
            generated_tokens=details.generated_tokens if details else None,
            seed=details.seed if details else None,
        )

    def _rest_of(self, generated_text: str, fallback: str) -> str:
        sent = "".join(self._sent)
        # `return_full_text` prefixes the prompt: then the token's own text is all we have
        return generated_text[len(sent) :] if generated_text.startswith(sent) else fallback

    def end(self) -> StreamChunk | None:
        if not self.finished:
            raise _cut_short(self.request_id)
        return None


class OpenAIStreamParser:
    def __init__(self, kind: OpenAIKind, request_id: str | None) -> None:
        self.kind = kind
        self.request_id = request_id
        self.finished = False
        self._index = 0
        self._text: list[str] = []
        self._final: StreamChunk | None = None
        self._usage: oai.Usage | None = None

    def feed(self, data: str) -> StreamChunk | None:
        if self.finished or not data.strip():
            return None
        if data.strip() == DONE:
            return self.end()
        payload = _payload(data, self.request_id)
        usage: oai.Usage | None
        choices: list[tuple[str | None, Any, str | None]]
        try:
            if self.kind == "chat":
                chat = oai.ChatCompletionChunk.model_validate(payload)
                usage, choices = (
                    chat.usage,
                    [(c.delta.content, c.logprobs, c.finish_reason) for c in chat.choices],
                )
            else:
                comp = oai.Completion.model_validate(payload)
                usage, choices = comp.usage, [(c.text, c.logprobs, c.finish_reason) for c in comp.choices]
        except PydanticValidationError as exc:
            raise malformed(f"OpenAI {self.kind} stream event", exc) from exc
        chunk = self._chunk(*choices[0]) if choices else None
        if usage is not None:
            self._usage = usage
        if self._final is not None and self._usage is not None:
            return self.end()
        return chunk

    def _chunk(self, text: str | None, logprobs: Any, reason: str | None) -> StreamChunk | None:
        logprob = _logprob(logprobs)
        if not text and logprob is None and reason is None:
            return None
        chunk = StreamChunk(text=text or "", index=self._index, logprob=logprob, request_id=self.request_id)
        self._index += 1
        self._text.append(chunk.text)
        if reason is None:
            return chunk
        self._final = replace(
            chunk, finished=True, finish_reason=FinishReason.parse(reason), generated_text="".join(self._text)
        )
        return None  # held until the usage chunk or [DONE]

    def end(self) -> StreamChunk | None:
        if self.finished:
            return None
        if self._final is None:
            raise _cut_short(self.request_id)
        self.finished = True
        if self._usage is None:
            return self._final
        usage = self._usage
        return replace(
            self._final, prompt_tokens=usage.prompt_tokens, generated_tokens=usage.completion_tokens
        )


def _logprob(logprobs: Any) -> float | None:
    if isinstance(logprobs, oai.ChoiceLogprobs) and logprobs.content:
        return logprobs.content[0].logprob
    if isinstance(logprobs, oai.CompletionLogprobs) and logprobs.token_logprobs:
        return logprobs.token_logprobs[0]
    return None
