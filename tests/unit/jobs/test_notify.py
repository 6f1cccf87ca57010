"""Webhook notifications, delivered to a real HTTP receiver on 127.0.0.1 that checks signatures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import SecretStr

from twinserve.errors import ValidationError
from twinserve.jobs.notify import (
    DELIVERY_HEADER,
    INLINE_LIMIT_BYTES,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Notification,
    NotificationStatus,
    Notifier,
    sign,
    verify_signature,
)

SECRET = "whsec-Sup3rS3cretNeverLogged"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    verified: bool


@dataclass
class Receiver:
    """A webhook receiver: answers `replies` in order (then 200), records every delivery."""

    url: str
    replies: list[int]
    deliveries: list[Delivery] = field(default_factory=list)

    def events(self) -> list[Notification]:
        return [Notification.model_validate_json(d.body) for d in self.deliveries]


@contextlib.contextmanager
def receiver(replies: tuple[int, ...] = (), secret: str = SECRET) -> Iterator[Receiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    rec = Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook?token=urltoken", list(replies))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ok = verify_signature(
                secret, body, self.headers.get(TIMESTAMP_HEADER, ""), self.headers.get(SIGNATURE_HEADER, "")
            )
            rec.deliveries.append(Delivery(dict(self.headers), body, ok))
            status = rec.replies.pop(0) if rec.replies else (200 if ok else 401)
            reply = b"receiver-said-something-private"
            self.send_response(status)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"  # nothing listens there now


def _notifier(success: str | None, error: str | None = None, **kwargs: object) -> Notifier:
    options: dict[str, object] = {"max_attempts": 5, "backoff_base_s": 0.01, "timeout_s": 2, **kwargs}
    return Notifier(success, error, SecretStr(SECRET), **options)  # type: ignore[arg-type]


def _done(body: bytes | None = b'{"generated_text": "hello"}', **fields: object) -> Notification:
    values: dict[str, object] = {
        "inference_id": "inf-1",
        "status": NotificationStatus.COMPLETED,
        "endpoint": "twin",
        "output_location": "file:///srv/results/inf-1.out",
        **fields,
    }
    return Notification.of(body=body, **values)


def test_delivered_signed_and_verified_by_the_receiver() -> None:
    with receiver() as hook:
        notifier = _notifier(hook.url)
        assert notifier.notify(_done()) is True
        notifier.close()
    (delivery,) = hook.deliveries
    assert delivery.verified
    assert delivery.headers[SIGNATURE_HEADER].startswith("sha256=")
    event = hook.events()[0]
    assert event.inference_id == "inf-1" and event.status is NotificationStatus.COMPLETED
    assert event.response == {"generated_text": "hello"} and event.response_inlined
    assert json.loads(delivery.body)["output_location"] == "file:///srv/results/inf-1.out"


def test_failures_go_to_the_error_url_only() -> None:
    with receiver() as ok_hook, receiver() as error_hook:
        notifier = _notifier(ok_hook.url, error_hook.url)
        failed = Notification.of(
            inference_id="inf-2",
            status=NotificationStatus.FAILED,
            endpoint="twin",
            failure_location="file:///srv/results/failures/inf-2.error",
            failure_reason="model error",
        )
        assert notifier.notify(failed)
    assert ok_hook.deliveries == []
    assert [e.failure_reason for e in error_hook.events()] == ["model error"]
    assert _notifier(ok_hook.url).notify(failed) is True  # no error URL: nothing to deliver


def test_retried_on_500_until_delivered_on_the_third_attempt() -> None:
    with receiver(replies=(500, 503)) as hook:
        assert _notifier(hook.url).notify(_done())
    assert len(hook.deliveries) == 3
    assert all(d.verified for d in hook.deliveries)
    assert len({d.headers[DELIVERY_HEADER] for d in hook.deliveries}) == 1  # one notification
    assert len({d.body for d in hook.deliveries}) == 1


def test_429_is_retried_and_400_is_not() -> None:
    with receiver(replies=(429,)) as hook:
        assert _notifier(hook.url).notify(_done())
    assert len(hook.deliveries) == 2
    with receiver(replies=(400, 400)) as hook:
        assert _notifier(hook.url).notify(_done()) is False
    assert len(hook.deliveries) == 1


def test_gives_up_after_max_attempts() -> None:
    with receiver(replies=(500,) * 10) as hook:
        assert _notifier(hook.url, max_attempts=3).notify(_done()) is False
    assert len(hook.deliveries) == 3


def test_receiver_down_returns_false_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="twinserve.jobs.notify")
    started = time.monotonic()
    assert _notifier(_closed_port_url(), max_attempts=3).notify(_done()) is False
    assert time.monotonic() - started < 5
    (record,) = [r for r in caplog.records if r.name == "twinserve.jobs.notify"]
    assert record.levelno == logging.WARNING and "3 attempt" in record.getMessage()
    assert "ConnectError" in record.getMessage()


def test_the_secret_never_reaches_logs_or_reprs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore included
    with receiver(replies=(500, 400)) as hook:
        notifier = _notifier(hook.url, _closed_port_url(), max_attempts=2)
        assert notifier.notify(_done()) is False
        failed = _done(status=NotificationStatus.FAILED, failure_reason="x")
        assert notifier.notify(failed) is False
        assert asyncio.run(notifier.anotify(failed)) is False
    assert caplog.records  # something was logged
    for text in (caplog.text, repr(notifier), str(vars(notifier))):
        assert SECRET not in text
    assert "receiver-said-something-private" not in caplog.text
    # webhook URLs may carry tokens: our logs show the host only (httpx's own INFO line prints
    # the whole URL; the daemons set the httpx logger to WARNING)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("twinserve"))
    assert "127.0.0.1" in ours and "urltoken" not in ours


def test_anotify_retries_and_delivers() -> None:
    with receiver(replies=(502,)) as hook:
        assert asyncio.run(_notifier(hook.url).anotify(_done())) is True
    assert len(hook.deliveries) == 2 and all(d.verified for d in hook.deliveries)
    assert asyncio.run(_notifier(_closed_port_url(), max_attempts=2).anotify(_done())) is False


def test_inline_cut_off_at_128_kib() -> None:
    at_limit = json.dumps("x" * (INLINE_LIMIT_BYTES - 2)).encode()
    assert len(at_limit) == INLINE_LIMIT_BYTES
    inlined = _done(at_limit)
    assert inlined.response_inlined and inlined.response == "x" * (INLINE_LIMIT_BYTES - 2)
    over = _done(json.dumps("x" * (INLINE_LIMIT_BYTES - 1)).encode())
    assert not over.response_inlined and over.response is None
    assert over.output_location  # the answer is read from its location instead
    binary = _done(b"\x00\xffnot json")
    assert binary.response_base64 and binary.response_bytes() == b"\x00\xffnot json"
    assert not _done(b"\x00" * (INLINE_LIMIT_BYTES + 1)).response_inlined
    assert _done(None).response is None


def test_verify_signature_refuses_tampering_replays_and_junk() -> None:
    body, now = b'{"a": 1}', time.time()
    ts = str(int(now))
    signature = sign(SECRET, body, ts)
    assert verify_signature(SECRET, body, ts, signature, now=now)
    assert verify_signature(SecretStr(SECRET), body, ts, signature, now=now)
    assert not verify_signature(SECRET, body + b" ", ts, signature, now=now)
    assert not verify_signature("other", body, ts, signature, now=now)
    assert not verify_signature(SECRET, body, ts, signature, now=now + 301)  # a replay
    assert not verify_signature(SECRET, body, str(int(now) + 1), signature, now=now)
    assert not verify_signature(SECRET, body, "yesterday", signature, now=now)
    assert not verify_signature(SECRET, body, f" {ts}", signature, now=now)
    assert not verify_signature(SECRET, body, "-" + ts, signature, now=now)
    assert not verify_signature(SECRET, body, ts, "sha256=é", now=now)
    assert not verify_signature(SECRET, body, ts, signature.removeprefix("sha256="), now=now)


def test_unsigned_without_secret_and_urls_checked() -> None:
    with receiver() as hook:
        assert Notifier(hook.url, None, None, backoff_base_s=0.01).notify(_done()) is False  # 401
    assert SIGNATURE_HEADER not in hook.deliveries[0].headers
    for bad in ("ftp://example.com/hook", "http://example.com:port/hook", "hooks.example.com/x"):
        with pytest.raises(ValidationError):
            Notifier(None, bad, None)
