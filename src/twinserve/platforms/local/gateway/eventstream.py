"""`application/vnd.amazon.eventstream`: the framing `InvokeEndpointWithResponseStream` answers in.

Each message is a 12-byte prelude (total length, headers length, CRC32 of those 8 bytes),
headers, the payload, and a CRC32 of everything before it. Headers here are all strings
(type 7). SageMaker sends the container's bytes as `PayloadPart` events, cut wherever they
happened to arrive, and a failure after the 200 as one exception event (`ModelStreamError`,
`InternalStreamFailure`), after which the stream ends: botocore raises it as `EventStreamError`.

Only the encoder lives here; botocore's `EventStreamBuffer` is the decoder the tests hold it to.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Mapping

CONTENT_TYPE = "application/vnd.amazon.eventstream"
_STRING = 7  # header value type: utf-8 string with a 2-byte length
# botocore refuses payloads over 24 MiB; parts this size keep every message far below that
MAX_PART = 1024 * 1024


def encode_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One message: prelude, headers, payload, message CRC."""
    encoded = b"".join(_header(name, value) for name, value in headers.items())
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode("utf-8"), value.encode("utf-8")
    if len(raw_name) > 255 or len(raw_value) > 0xFFFF:
        raise ValueError(f"event stream header {name!r} is too long")
    return (
        struct.pack(">B", len(raw_name)) + raw_name + struct.pack(">BH", _STRING, len(raw_value)) + raw_value
    )


def payload_parts(data: bytes) -> Iterator[bytes]:
    """`PayloadPart` events carrying `data`: one, or several past `MAX_PART`; none for b""."""
    headers = {
        ":event-type": "PayloadPart",
        ":content-type": "application/octet-stream",
        ":message-type": "event",
    }
    for start in range(0, len(data), MAX_PART):
        yield encode_message(headers, data[start : start + MAX_PART])


def exception_event(kind: str, message: str, error_code: str | None = None) -> bytes:
    """An exception event (`ModelStreamError` with an `ErrorCode`, or `InternalStreamFailure`)."""
    body: dict[str, str] = {"Message": message}
    if error_code is not None:
        body["ErrorCode"] = error_code
    headers = {
        ":exception-type": kind,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_message(headers, json.dumps(body).encode())
