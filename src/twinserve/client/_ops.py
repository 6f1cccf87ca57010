"""`LLMClient`'s calls about the served model rather than generation: `/info`, `/tokenize`,
`/chat_tokenize`, `/health`.

What a caller that builds prompts needs (the RAG service trims its context to the model's
limits): the limits and template the server reports, and token counts made by the server's own
tokenizer, never estimated from characters. Like generation they go through a `Transport`
(`get` for `/info` and `/health`) and, but for `/health`, retry as `LLMClient`'s unary calls do.
`/health` answers for now: it is asked again by whoever polls it, and a retry would hide the
moment it turned. A transport that cannot reach a route (SageMaker Runtime reaches only
`/invocations`) raises `NotFoundError`, the error a server without the route (a TGI older than
`/chat_tokenize`) gives as well, so one `except NotFoundError` covers both.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from twinserve.client._errors import error_from_response, malformed
from twinserve.client._wire import Messages
from twinserve.client.transport import Response, Transport
from twinserve.client.types import ChatTokens, PromptToken, ServerInfo
from twinserve.errors import EngineDeadError, NotReadyError, TwinserveError
from twinserve.server.protocol import tgi

INFO = "/info"
HEALTH = "/health"
TOKENIZE = "/tokenize"
CHAT_TOKENIZE = "/chat_tokenize"

T = TypeVar("T")


class ServerCalls:
    """Mixed into `LLMClient`: it provides the transport, the model name and the retry loops."""

    if TYPE_CHECKING:
        _transport: Transport
        model: str | None

        def _unary(
            self, what: str, request: Callable[[], Response], read: Callable[[Response, str | None], T]
        ) -> T: ...

        async def _aunary(
            self,
            what: str,
            request: Callable[[], Awaitable[Response]],
            read: Callable[[Response, str | None], T],
        ) -> T: ...

    def info(self) -> ServerInfo:
        """What is served and under which limits (`GET /info`)."""
        return self._unary(INFO, lambda: self._transport.get(INFO), read_info)

    def tokenize(self, text: str, *, truncate: int | None = None) -> list[PromptToken]:
        """`text`'s tokens as `generate` would see them (`POST /tokenize`): the same `truncate`
        and the same input limit, so a prompt over it is a `ValidationError` here too."""
        body = tokenize_body(text, truncate)
        return self._unary(TOKENIZE, lambda: self._transport.send(TOKENIZE, body), read_tokens)

    def chat_tokenize(self, messages: Messages) -> ChatTokens:
        """The prompt `chat(messages)` would give the model (`POST /chat_tokenize`): its chat
        template's text and tokens; `.count` is that chat's `prompt_tokens`. No input limit."""
        body = self._chat_tokenize_body(messages)
        return self._unary(CHAT_TOKENIZE, lambda: self._transport.send(CHAT_TOKENIZE, body), read_chat_tokens)

    def health(self) -> bool:
        """True when the server serves (`GET /health` is 200); otherwise raises what it reports:
        `NotReadyError` (loading, draining), `EngineDeadError` (failed), `UnreachableError`, ….
        Never retried."""
        return read_health(self._transport.get(HEALTH))

    async def ainfo(self) -> ServerInfo:
        return await self._aunary(INFO, lambda: self._transport.aget(INFO), read_info)

    async def atokenize(self, text: str, *, truncate: int | None = None) -> list[PromptToken]:
        body = tokenize_body(text, truncate)
        return await self._aunary(TOKENIZE, lambda: self._transport.asend(TOKENIZE, body), read_tokens)

    async def achat_tokenize(self, messages: Messages) -> ChatTokens:
        body = self._chat_tokenize_body(messages)
        return await self._aunary(
            CHAT_TOKENIZE, lambda: self._transport.asend(CHAT_TOKENIZE, body), read_chat_tokens
        )

    async def ahealth(self) -> bool:
        return read_health(await self._transport.aget(HEALTH))

    def _chat_tokenize_body(self, messages: Messages) -> dict[str, Any]:
        # TGI's chat request wanted a `model` until 2.x (as in LLMClient._openai_call)
        return {"messages": [dict(m) for m in messages], "model": self.model or "tgi"}


# ----------------------------------------------------------------- bodies
def tokenize_body(text: str, truncate: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": text}
    if truncate is not None:
        body["parameters"] = {"truncate": truncate}
    return body


# ---------------------------------------------------------------- answers
class _InfoWire(BaseModel):
    """The fields of `/info` lifted into `ServerInfo`; any may be missing (a TGI peer's lacks
    ours), a present one must have its type."""

    model_config = ConfigDict(extra="ignore")

    model_id: str | None = None
    max_input_tokens: int | None = None
    max_input_length: int | None = None  # TGI before 2.0
    max_total_tokens: int | None = None
    registry_name: str | None = None
    registry_version: int | None = None
    prompt_template: str | None = None
    version: str | None = None


def read_info(response: Response, request_id: str | None) -> ServerInfo:
    parsed = _json_object(response.body, "info")
    try:
        wire = _InfoWire.model_validate(parsed)
    except PydanticValidationError as exc:
        raise malformed("info", exc) from exc
    return ServerInfo(
        model_id=wire.model_id,
        max_input_tokens=wire.max_input_tokens
        if wire.max_input_tokens is not None
        else wire.max_input_length,
        max_total_tokens=wire.max_total_tokens,
        registry_name=wire.registry_name,
        registry_version=wire.registry_version,
        prompt_template=wire.prompt_template,
        version=wire.version,
        raw=parsed,
    )


def read_tokens(response: Response, request_id: str | None) -> list[PromptToken]:
    try:
        tokens = tgi.TokenizeResponse.model_validate_json(response.body).root
    except PydanticValidationError as exc:
        raise malformed("tokenize response", exc) from exc
    return [_token(t) for t in tokens]


def read_chat_tokens(response: Response, request_id: str | None) -> ChatTokens:
    try:
        answer = tgi.ChatTokenizeResponse.model_validate_json(response.body)
    except PydanticValidationError as exc:
        raise malformed("chat_tokenize response", exc) from exc
    return ChatTokens(answer.templated_text, tuple(_token(t) for t in answer.tokenize_response))


def _token(token: tgi.SimpleToken) -> PromptToken:
    return PromptToken(id=token.id, text=token.text, start=token.start, stop=token.stop)


def read_health(response: Response) -> bool:
    if 200 <= response.status < 300:
        return True
    raise health_error(response)


def health_error(response: Response) -> TwinserveError:
    """A failed health check's error. twinserve says `{"status", "reason"}`: "failed" is an
    `EngineDeadError`, "loading" and "draining" a `NotReadyError`; TGI's `{"error_type":
    "healthcheck"}` (a shard failed its check) is dead too; an endpoint router's `{"healthy":
    false, "replicas"}` is not ready (replicas come and go); the rest maps by status."""
    rid = response.headers.get("x-request-id")
    payload = _json_or_empty(response.body)
    state, kind = payload.get("status"), payload.get("error_type")
    error: TwinserveError
    if response.status == 503 and isinstance(state, str):
        reason = payload.get("reason")
        message = f"the server is {state}" + (f": {reason}" if reason else "")
        error = EngineDeadError(message) if state == "failed" else NotReadyError(message)
    elif response.status == 503 and kind == "healthcheck":
        error = EngineDeadError(f"the server is unhealthy: {payload.get('error') or 'health check failed'}")
    elif response.status == 503 and payload.get("healthy") is False:  # an endpoint router's
        replicas = [r for r in payload.get("replicas") or [] if isinstance(r, dict)]
        states = ", ".join(sorted({str(r.get("status")) for r in replicas})) or "none"
        error = NotReadyError(f"no healthy replica behind the endpoint ({len(replicas)}: {states})")
    else:
        return error_from_response(response.status, response.body, rid)
    if rid:
        error.add_note(f"request_id: {rid}")
    return error


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise malformed(what, exc) from exc
    if not isinstance(parsed, dict):
        raise malformed(what, ValueError(f"a JSON object was expected, not {type(parsed).__name__}"))
    return parsed


def _json_or_empty(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
