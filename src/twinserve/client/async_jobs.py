"""What `LLMClient.submit_async` returns: an `AsyncInvocation`, and the `AsyncStatus` it reports.

An asynchronous invocation is queued by the endpoint (`202`), run by a worker later, and its
answer (or error body) stored. The invocation object only names it; every call on it asks the
transport again, so it can be kept, logged and polled from anywhere the client works. `result()`
waits until the job is final and returns what the synchronous call returns for the same body
(a `GenerationResult`), or raises the error the stored error body describes, mapped as the
client maps any error answer.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from twinserve.client import _wire
from twinserve.client._errors import error_from_event, error_from_response, malformed
from twinserve.client.transport import AsyncRef, Response
from twinserve.client.types import GenerationResult
from twinserve.errors import ModelError, RequestTimeoutError, ServerError, TwinserveError

if TYPE_CHECKING:
    from twinserve.client.llm_client import LLMClient

DEFAULT_POLL_INTERVAL = 1.0  # seconds between two status calls while `result()` waits
_UNSUCCESSFUL = frozenset({"failed", "expired"})  # X-Job-Status of an error body
_ORIGINAL_STATUS = "x-original-status"


class AsyncState(enum.StrEnum):
    """Where an asynchronous invocation is (the job service's names).

    `pending` is for platforms that cannot tell queued from running: SageMaker has no status
    API, only the answer or error object appearing in S3.
    """

    QUEUED = "queued"
    RUNNING = "running"
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        """Nothing changes after this: `result()` answers or raises at once."""
        return self in (AsyncState.SUCCEEDED, AsyncState.FAILED, AsyncState.EXPIRED)


class AsyncStatus(BaseModel):
    """One look at an invocation. Fields a platform does not report are None (SageMaker:
    everything but the status, the locations and `finished_at`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    inference_id: str = Field(description="The invocation's id (SageMaker's InferenceId).")
    status: AsyncState = Field(description="Where it is; see `AsyncState`.")
    attempts: int | None = Field(None, description="Deliveries to a worker so far (retries included).")
    max_attempts: int | None = Field(None, description="Deliveries before it fails for good.")
    failure_reason: str | None = Field(None, description="Why it failed or expired, in one line.")
    output_location: str | None = Field(None, description="Where the answer is (or will be).")
    failure_location: str | None = Field(None, description="Where the error body is (or will be).")
    created_at: datetime | None = Field(None, description="When it was queued.")
    started_at: datetime | None = Field(None, description="When the latest attempt started.")
    finished_at: datetime | None = Field(None, description="When it became final.")


def read_status(response: Response, request_id: str | None) -> AsyncStatus:
    try:
        return AsyncStatus.model_validate_json(response.body)
    except PydanticValidationError as exc:
        raise malformed("async invocation status", exc) from exc


@dataclass(frozen=True)
class AsyncInvocation:
    """A queued invocation of `client`'s endpoint: poll it with `status()`, wait with `result()`.

    `path` is the route the client built the body for (it tells how to read the answer);
    None for a body the caller gave or an input at a location: the answer's shape tells then.
    """

    inference_id: str
    output_location: str | None
    failure_location: str | None
    _client: LLMClient = field(repr=False, compare=False)
    _path: str | None = field(default=None, repr=False, compare=False)

    @property
    def ref(self) -> AsyncRef:
        return AsyncRef(self.inference_id, self.output_location, self.failure_location)

    # ---------------------------------------------------------- sync
    def status(self) -> AsyncStatus:
        """Where the invocation is now (429/503 and lost connections are retried)."""
        transport = self._client._transport
        return self._client._unary(self._what, lambda: transport.job_status(self.ref), read_status)

    def result(
        self, timeout: float | None = None, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> GenerationResult:
        """Wait until the invocation is final and return its answer, or raise its error.

        `timeout` seconds (None: forever) → `TimeoutError` naming the id; the job goes on, and
        a later `result()` can still collect it. A failed job raises the error its error body
        describes (`ValidationError`, `ModelError`, …); an expired one `RequestTimeoutError`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status.status.is_final:
                return self._outcome(status)
            time.sleep(self._wait(status, deadline, timeout, poll_interval))

    def _outcome(self, status: AsyncStatus) -> GenerationResult:
        _raise_if_expired(status)
        transport = self._client._transport
        return self._client._unary(
            self._what,
            lambda: _failure_as_answer(transport.job_output(self.ref)),
            lambda response, rid: self._answer(response, rid, status),
        )

    # --------------------------------------------------------- async
    async def astatus(self) -> AsyncStatus:
        transport = self._client._transport
        return await self._client._aunary(self._what, lambda: transport.ajob_status(self.ref), read_status)

    async def aresult(
        self, timeout: float | None = None, poll_interval: float = DEFAULT_POLL_INTERVAL
    ) -> GenerationResult:
        """`result()` for asyncio: the event loop runs on while it waits."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = await self.astatus()
            if status.status.is_final:
                return await self._aoutcome(status)
            await asyncio.sleep(self._wait(status, deadline, timeout, poll_interval))

    async def _aoutcome(self, status: AsyncStatus) -> GenerationResult:
        _raise_if_expired(status)
        transport = self._client._transport

        async def output() -> Response:
            return _failure_as_answer(await transport.ajob_output(self.ref))

        return await self._client._aunary(
            self._what, output, lambda response, rid: self._answer(response, rid, status)
        )

    # --------------------------------------------------------- shared
    @property
    def _what(self) -> str:
        return f"async invocation {self.inference_id}"

    def _wait(
        self, status: AsyncStatus, deadline: float | None, timeout: float | None, poll_interval: float
    ) -> float:
        if deadline is None:
            return poll_interval
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"async invocation {self.inference_id} is still {status.status} after {timeout} s"
            )
        return min(poll_interval, left)

    def _answer(self, response: Response, request_id: str | None, status: AsyncStatus) -> GenerationResult:
        if response.headers.get("x-job-status") in _UNSUCCESSFUL:
            raise failure_error(response, request_id, self.inference_id, status.failure_reason)
        path = self._path or _wire.answer_path(response.body)
        answer = Response(response.status, response.headers, _wire.unwrapped(path, response.body))
        # the job service calls the model with the inference id as its x-request-id
        return _wire.reader(path)(answer, request_id or self.inference_id)


def _raise_if_expired(status: AsyncStatus) -> None:
    if status.status is AsyncState.EXPIRED:
        reason = f": {status.failure_reason}" if status.failure_reason else ""
        raise RequestTimeoutError(
            f"async invocation {status.inference_id} expired: no worker started it within its "
            f"time to live{reason}"
        )


def _failure_as_answer(response: Response) -> Response:
    """A failed job's error body is its answer, whatever status it comes with (so it is never
    retried: a stored 503 stays a 503); the status goes along in a header."""
    if response.headers.get("x-job-status") not in _UNSUCCESSFUL or 200 <= response.status < 300:
        return response
    return Response(200, {**response.headers, _ORIGINAL_STATUS: str(response.status)}, response.body)


def failure_error(
    response: Response, request_id: str | None, inference_id: str, reason: str | None
) -> TwinserveError:
    """The error a failed job's error body describes: by the status it was stored with when
    there is one, else by its `error_type` (TGI's or OpenAI's shape), else a `ModelError`."""
    status = _wire.int_header(response.headers, _ORIGINAL_STATUS)
    payload = _json(response.body)
    error: TwinserveError | None = None
    if status is not None and status >= 400:
        error = error_from_response(status, response.body, request_id)
    elif isinstance(payload, dict) and "error" in payload:
        error = error_from_event(payload, request_id)
    if error is None or type(error) is ServerError:  # no type said: the model failed it
        text = response.body.decode("utf-8", errors="replace").strip()
        error = ModelError(_message(payload) or text[:500] or reason or "the async invocation failed")
        if request_id:
            error.add_note(f"request_id: {request_id}")
    error.add_note(f"inference_id: {inference_id}")
    if reason:
        error.add_note(f"failure_reason: {reason}")
    return error


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _message(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    error = payload.get("error", payload.get("message"))
    if isinstance(error, dict):
        error = error.get("message")
    return str(error) if error else None
