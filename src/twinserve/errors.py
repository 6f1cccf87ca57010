"""The one error tree of twinserve.

```
TwinserveError
├── ClientError               the caller can fix it; carries an HTTP status (4xx)
│   ├── ValidationError       422  bad parameters, input over the limits (400 on OpenAI routes)
│   │   └── ContextLengthError  422  prompt (+ new tokens) longer than the model's limits
│   ├── OverloadedError       429  queue or concurrency limit reached; retry later
│   ├── NotFoundError         404  unknown model, file or reference
│   ├── ConflictError         409  the thing changed meanwhile, or already exists
│   │   └── BusyError         409  another operation holds it now; retry when it is done
│   ├── UnauthorizedError     401  missing or wrong API key
│   └── PayloadTooLargeError  413  request body over the payload limit
└── ServerError               twinserve or the model failed; not the caller's fault
    ├── ModelError            424  a forward pass (or the model's files) failed for this request
    │   └── LLMFailedError    424  (RAG service) the LLM it calls failed or refused; carries its answer
    ├── ModelLoadError        500  weights/config/tokenizer could not be loaded
    ├── BadGatewayError       502  (router) a replica failed before answering, not retried
    ├── NotReadyError         503  the model is still loading, or the server is draining
    ├── EngineDeadError       503  the engine cannot continue; health reports it
    ├── UnreachableError      503  (client side) no connection to the server could be made
    └── RequestTimeoutError   504  (client side) the server did not answer in time
```
ModelError keeps TGI's 424 ("failed dependency") so clients written for TGI
classify it the same way. Protocol layers translate these with one mapping
function per wire format; nothing below the server knows HTTP.
"""

from __future__ import annotations


class TwinserveError(Exception):
    """Base of every error twinserve raises on purpose."""

    status_code: int = 500
    error_type: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientError(TwinserveError):
    """The request is wrong or cannot be served now; the caller can act on it."""

    status_code = 400
    error_type = "client"


class ValidationError(ClientError):
    """Invalid generation parameters or an input over the configured limits.

    `param` names the field at fault where one is (OpenAI's error `param`), dotted for
    nested fields (`parameters.temperature`, `messages.0.content`).
    """

    status_code = 422
    error_type = "validation"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(ValidationError):
    """The prompt, or the prompt plus the tokens asked for, does not fit the model's limits.

    Carries the numbers so each wire format words it as its clients expect (TGI's
    "`inputs` must have less than …", OpenAI's "maximum context length is …", which
    the openai SDK and LiteLLM's context-window fallbacks recognise).
    """

    def __init__(
        self, message: str, *, limit: int, prompt_tokens: int, new_tokens: int, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.limit = limit
        self.prompt_tokens = prompt_tokens
        self.new_tokens = new_tokens


class OverloadedError(ClientError):
    """Too many requests in flight or waiting; raised immediately, never after a hang."""

    status_code = 429
    error_type = "overloaded"


class NotFoundError(ClientError):
    """A model, file or reference that does not exist."""

    status_code = 404
    error_type = "not_found"


class ConflictError(ClientError):
    """A stale write (someone changed the thing since it was read), or a create of an existing one."""

    status_code = 409
    error_type = "conflict"


class BusyError(ConflictError):
    """Another operation holds the thing (e.g. an endpoint being updated); it is worth waiting for."""

    error_type = "busy"


class InterruptedOperationError(BusyError):
    """The operation holding the thing was interrupted (its process died): recover it, then retry."""

    error_type = "interrupted"


class PortTakenError(ConflictError):
    """A port an endpoint's URL names is held by another process: restarting there is impossible,
    and moving would silently change the URL its clients use."""

    error_type = "port_taken"


class UnauthorizedError(ClientError):
    """The route needs an API key (`Authorization: Bearer …`) and none or a wrong one came."""

    status_code = 401
    error_type = "unauthorized"


class PayloadTooLargeError(ClientError):
    """The request body is larger than the server accepts."""

    status_code = 413
    error_type = "payload_too_large"


class ServerError(TwinserveError):
    """Something on the serving side failed."""

    status_code = 500
    error_type = "server"


class ModelError(ServerError):
    """The model failed while generating for this request (others keep being served)."""

    status_code = 424
    error_type = "generation"


class LLMFailedError(ModelError):
    """The LLM a service depends on (the RAG service's) failed or refused a request.

    `upstream` says what the LLM answered, in one shape whatever went wrong: its HTTP status
    (None when it could not be reached), error_type and message.
    """

    error_type = "llm_failed"

    def __init__(self, message: str, upstream: dict[str, object]) -> None:
        super().__init__(message)
        self.upstream = upstream

    @classmethod
    def of(cls, cause: TwinserveError) -> LLMFailedError:
        status = None if isinstance(cause, UnreachableError | RequestTimeoutError) else cause.status_code
        upstream: dict[str, object] = {
            "status": status,
            "error_type": cause.error_type,
            "message": cause.message,
        }
        return cls(f"the LLM failed: {cause.message}", upstream)


class ModelLoadError(ServerError):
    """Weights, config or tokenizer cannot be loaded (e.g. pickle weights, missing files)."""

    status_code = 500
    error_type = "model_load"


class UpdateRolledBackError(ModelLoadError):
    """An endpoint update did not become healthy (or failed while baking) and was rolled back:
    the old version still serves (raised by every platform)."""

    error_type = "update_rolled_back"


class EngineDeadError(ServerError):
    """The engine loop stopped and cannot serve any request; health turns unhealthy."""

    status_code = 503
    error_type = "unhealthy"


class NotReadyError(ServerError):
    """Not serving yet (model loading) or any more (draining); retry on another replica or later."""

    status_code = 503
    error_type = "not_ready"


class UnreachableError(ServerError):
    """The client could not connect (refused, DNS, TLS); safe to retry, nothing was sent."""

    status_code = 503
    error_type = "unreachable"


class RequestTimeoutError(ServerError):
    """The client gave up waiting for the server."""

    status_code = 504
    error_type = "timeout"


class BadGatewayError(ServerError):
    """The endpoint router's replica failed after it may have started on the request (so no retry)."""

    status_code = 502
    error_type = "bad_gateway"
