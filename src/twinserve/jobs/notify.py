"""Webhooks when an asynchronous request ends: the local equivalent of SageMaker's SNS topics.

SageMaker Asynchronous Inference publishes to a SuccessTopic or an ErrorTopic; here the
operator gives a success URL and an error URL, and each finished request is POSTed as one JSON
`Notification` to the one that matches (no URL for that outcome: nothing is sent).

Signature (when a secret is set), the scheme of Stripe's and Slack's webhooks:
    X-Twinserve-Timestamp: <unix seconds>
    X-Twinserve-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body bytes)>
The timestamp is inside the signed message so a captured request cannot be replayed later:
`verify_signature` refuses one older (or newer) than `tolerance_s`. Each attempt is signed
afresh; `X-Twinserve-Delivery` stays the same across the attempts of one notification, so a
receiver can drop a duplicate (a retry after a reply that was lost).

Delivery is retried with exponential backoff and jitter on connection errors, timeouts, 429
and 5xx (honouring a short Retry-After), never on other answers: a 4xx says the receiver
will not take it, and asking again will not change that. A notification that cannot be
delivered is logged and reported as False; it never raises into the worker, whose job (the
result) is already done. Logs name the receiver by scheme and host only — webhook URLs often
carry a token — and never carry the secret, the signature or the receiver's reply.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from twinserve import __version__
from twinserve.errors import ValidationError

log = logging.getLogger(__name__)

INLINE_LIMIT_BYTES = 128 * 1024
SIGNATURE_HEADER = "X-Twinserve-Signature"
TIMESTAMP_HEADER = "X-Twinserve-Timestamp"
DELIVERY_HEADER = "X-Twinserve-Delivery"
_RETRY_AFTER_MAX_S = 60.0


class NotificationStatus(enum.StrEnum):
    """How the request ended (SageMaker's `invocationStatus` values)."""

    COMPLETED = "Completed"
    FAILED = "Failed"

    @property
    def succeeded(self) -> bool:
        return self is NotificationStatus.COMPLETED


class Notification(BaseModel):
    """The JSON body POSTed to the webhook when an asynchronous request ends."""

    model_config = ConfigDict(extra="forbid")

    event: str = Field("InferenceResult", description="Always InferenceResult (SageMaker's eventName).")
    inference_id: str = Field(description="The id the submit call returned.")
    status: NotificationStatus = Field(description="Completed or Failed.")
    endpoint: str = Field(description="The endpoint that served the request.")
    time: datetime = Field(default_factory=lambda: datetime.now(UTC), description="When it ended (UTC).")
    output_location: str | None = Field(None, description="Where the answer is (Completed).")
    failure_location: str | None = Field(None, description="Where the error body is (Failed).")
    failure_reason: str | None = Field(None, description="Why it failed, one line (Failed).")
    response: Any = Field(
        None, description=f"The answer itself when at most {INLINE_LIMIT_BYTES} bytes: JSON, or base64 text."
    )
    response_base64: bool = Field(False, description="True when `response` is base64 (not JSON) bytes.")
    response_inlined: bool = Field(
        False, description="False when the answer is too large (read the location)."
    )

    @classmethod
    def of(cls, *, body: bytes | None = None, **fields: Any) -> Notification:
        """A notification with `body` inlined when it is at most INLINE_LIMIT_BYTES: parsed JSON
        if it is JSON, else base64 with `response_base64` set. Larger bodies stay behind the
        location, as SNS messages (256 KB at most) cannot carry them either."""
        if body is None or len(body) > INLINE_LIMIT_BYTES:
            return cls(**fields)
        try:
            parsed = json.loads(body)
        except ValueError:  # not UTF-8, or not JSON
            encoded = base64.b64encode(body).decode("ascii")
            return cls(**fields, response=encoded, response_base64=True, response_inlined=True)
        return cls(**fields, response=parsed, response_inlined=True)

    def response_bytes(self) -> bytes | None:
        """The inlined answer as bytes again (JSON re-serialised compactly); None if not inlined."""
        if not self.response_inlined:
            return None
        if self.response_base64:
            return base64.b64decode(self.response)
        return json.dumps(self.response, separators=(",", ":")).encode()


def sign(secret: str | bytes, body: bytes, timestamp: str) -> str:
    """`sha256=<hex>`: HMAC-SHA256 keyed by `secret` over `<timestamp>.` + the raw body."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: str | bytes | SecretStr,
    body: bytes,
    timestamp: str,
    signature: str,
    tolerance_s: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Whether `signature` (the X-Twinserve-Signature header) signs `body` at `timestamp` (the
    X-Twinserve-Timestamp header) with `secret`, and the timestamp is within `tolerance_s`
    seconds of `now`. Compare the raw body bytes as received, before any JSON parsing."""
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    if not isinstance(timestamp, str) or not (timestamp.isascii() and timestamp.isdigit()):
        return False  # unix seconds in ASCII digits, exactly as sent and signed
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp)
    try:
        given = signature.strip().encode("ascii")
    except (AttributeError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(expected.encode("ascii"), given)


def _host(url: str) -> str:
    """`scheme://host[:port]` of a URL: what logs and reprs may show of a webhook."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a port that is not a number
        port = ":?"
    return f"{parts.scheme}://{parts.hostname or '?'}{port}"


def _check_url(url: str | None, name: str) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        ok = False
    else:
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    if not ok:
        raise ValidationError(
            f"{name} must be an http(s)://host[:port]/… URL, not {_host(url)!r}", param=name
        )
    return url


@dataclass
class _Attempt:
    """What one attempt's outcome means: done (delivered or given up), or wait and retry."""

    delivered: bool = False
    retry: bool = False
    wait_s: float | None = None  # the receiver's Retry-After, if it gave one
    detail: str = ""


class Notifier:
    """POSTs `Notification`s to a success and an error webhook, signed, retried, never raising.

    `client` / `async_client` are used as given and not closed (their timeouts apply);
    otherwise a client with `timeout_s` is made (a sync one kept until `close`, an async one
    per `anotify`, since an AsyncClient belongs to one event loop).
    """

    def __init__(
        self,
        success_url: str | None,
        error_url: str | None,
        secret: SecretStr | None,
        *,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        timeout_s: float = 10,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.success_url = _check_url(success_url, "success_url")
        self.error_url = _check_url(error_url, "error_url")
        self._secret = secret
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self._client = client
        self._own_client: httpx.Client | None = None
        self._async_client = async_client

    def __repr__(self) -> str:
        hosts = [_host(u) if u else None for u in (self.success_url, self.error_url)]
        return f"Notifier(success={hosts[0]!r}, error={hosts[1]!r}, signed={self._secret is not None})"

    def close(self) -> None:
        if self._own_client is not None:
            self._own_client.close()
            self._own_client = None

    def url_for(self, event: Notification) -> str | None:
        return self.success_url if event.status.succeeded else self.error_url

    def headers(self, body: bytes, delivery: str) -> dict[str, str]:
        """The headers of one attempt (signed now, so a late retry is still within tolerance)."""
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"twinserve/{__version__}",
            TIMESTAMP_HEADER: timestamp,
            DELIVERY_HEADER: delivery,
        }
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret.get_secret_value(), body, timestamp)
        return headers

    def notify(self, event: Notification) -> bool:
        """Deliver `event`; True when delivered (or no URL is set for its outcome), else False."""
        url = self.url_for(event)
        if url is None:
            return True
        body, delivery = event.model_dump_json().encode(), uuid.uuid4().hex
        try:
            client = self._sync_client()
            for attempt in range(1, self.max_attempts + 1):
                outcome = self._send(client, url, body, delivery)
                if not outcome.retry or attempt == self.max_attempts:
                    return self._finish(event, url, attempt, outcome)
                time.sleep(self._delay(attempt, outcome.wait_s))
        except Exception as exc:  # a notification must never take the worker down
            self._log_failure(event, url, 0, type(exc).__name__)
        return False

    async def anotify(self, event: Notification) -> bool:
        """`notify` for async workers, over httpx.AsyncClient."""
        url = self.url_for(event)
        if url is None:
            return True
        body, delivery = event.model_dump_json().encode(), uuid.uuid4().hex
        try:
            if self._async_client is not None:
                return await self._adeliver(self._async_client, event, url, body, delivery)
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                return await self._adeliver(client, event, url, body, delivery)
        except Exception as exc:
            self._log_failure(event, url, 0, type(exc).__name__)
        return False

    async def _adeliver(
        self, client: httpx.AsyncClient, event: Notification, url: str, body: bytes, delivery: str
    ) -> bool:
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = await client.post(url, content=body, headers=self.headers(body, delivery))
                outcome = self._judge(response)
            except httpx.TransportError as exc:
                outcome = _Attempt(retry=True, detail=type(exc).__name__)
            if not outcome.retry or attempt == self.max_attempts:
                return self._finish(event, url, attempt, outcome)
            await asyncio.sleep(self._delay(attempt, outcome.wait_s))
        return False  # pragma: no cover - the loop always returns

    def _sync_client(self) -> httpx.Client:
        if self._client is not None:
            return self._client
        if self._own_client is None:
            self._own_client = httpx.Client(timeout=self.timeout_s)
        return self._own_client

    def _send(self, client: httpx.Client, url: str, body: bytes, delivery: str) -> _Attempt:
        try:
            response = client.post(url, content=body, headers=self.headers(body, delivery))
        except httpx.TransportError as exc:  # refused, reset, DNS, timeouts: worth another try
            return _Attempt(retry=True, detail=type(exc).__name__)
        return self._judge(response)

    @staticmethod
    def _judge(response: httpx.Response) -> _Attempt:
        status = response.status_code
        if 200 <= status < 300:
            return _Attempt(delivered=True)
        if status == 429 or status >= 500:
            return _Attempt(retry=True, wait_s=_retry_after(response), detail=f"HTTP {status}")
        return _Attempt(detail=f"HTTP {status}")  # 3xx/4xx: the receiver refuses; retrying won't help

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with equal jitter (half fixed, half random), at most backoff_max_s;
        a receiver's Retry-After wins when it asks for longer (up to a minute)."""
        step = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        delay = step / 2 + random.uniform(0, step / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, _RETRY_AFTER_MAX_S))
        return delay

    def _finish(self, event: Notification, url: str, attempts: int, outcome: _Attempt) -> bool:
        if outcome.delivered:
            log.debug("notified %s of %s (attempt %d)", _host(url), event.inference_id, attempts)
            return True
        self._log_failure(event, url, attempts, outcome.detail)
        return False

    @staticmethod
    def _log_failure(event: Notification, url: str, attempts: int, detail: str) -> None:
        log.warning(
            "webhook for inference %s (%s) to %s not delivered after %d attempt(s): %s",
            event.inference_id,
            event.status.value,
            _host(url),
            attempts,
            detail,
        )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date; the backoff is good enough


__all__ = [
    "INLINE_LIMIT_BYTES",
    "Notification",
    "NotificationStatus",
    "Notifier",
    "sign",
    "verify_signature",
]
