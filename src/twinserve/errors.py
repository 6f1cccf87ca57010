"""The one error tree of twinserve.

```
TwinserveError
├── ClientError               the caller can fix it; carries an HTTP status (4xx)
│   ├── ValidationError       422  bad parameters, input over the limits
│   ├── OverloadedError       429  queue or concurrency limit reached; retry later
│   └── NotFoundError         404  unknown model, file or reference
└── ServerError               twinserve or the model failed; not the caller's fault
    ├── ModelError            424  a forward pass (or the model's files) failed for this request
    ├── ModelLoadError        500  weights/config/tokenizer could not be loaded
    └── EngineDeadError       503  the engine cannot continue; health reports it
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
    """Invalid generation parameters or an input over the configured limits."""

    status_code = 422
    error_type = "validation"


class OverloadedError(ClientError):
    """Too many requests in flight or waiting; raised immediately, never after a hang."""

    status_code = 429
    error_type = "overloaded"


class NotFoundError(ClientError):
    """A model, file or reference that does not exist."""

    status_code = 404
    error_type = "not_found"


class ServerError(TwinserveError):
    """Something on the serving side failed."""

    status_code = 500
    error_type = "server"


class ModelError(ServerError):
    """The model failed while generating for this request (others keep being served)."""

    status_code = 424
    error_type = "generation"


class ModelLoadError(ServerError):
    """Weights, config or tokenizer cannot be loaded (e.g. pickle weights, missing files)."""

    status_code = 500
    error_type = "model_load"


class EngineDeadError(ServerError):
    """The engine loop stopped and cannot serve any request; health turns unhealthy."""

    status_code = 503
    error_type = "unhealthy"
