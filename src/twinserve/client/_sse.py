"""Server-sent events from bytes cut anywhere: the `data` of each event, in order.

SageMaker's response stream hands over the container's bytes in `PayloadPart`s that end
wherever a network read ended: in the middle of a line, between `\\r` and `\\n`, inside a UTF-8
character. Lines are cut on bytes first (no UTF-8 sequence contains CR or LF, so a complete
line always decodes), then read by the rules httpx-sse follows, so `SageMakerTransport`
yields exactly what `HttpTransport` yields for the same bytes: comments (`: keep-alive`) are
skipped, several `data:` lines join with "\\n", and an event is only dispatched by a blank
line (one cut off at the end of the stream is dropped).
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")


class SSEDecoder:
    """Feed chunks of bytes; get back the data of every event they complete."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        out: list[str] = []
        start = 0
        for match in _LINE_END.finditer(self._buffer):
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break  # maybe the first half of CRLF: wait for the next byte
            data = self._line(self._buffer[start : match.start()].decode("utf-8", errors="replace"))
            if data is not None:
                out.append(data)
            start = match.end()
        self._buffer = self._buffer[start:]
        return out

    def end(self) -> list[str]:
        """The stream is over: a trailing CR ends its line; an unterminated line is dropped,
        and so is an event no blank line dispatched."""
        if self._buffer.endswith(b"\r"):
            return self.feed(b"\n")
        return []

    def _line(self, line: str) -> str | None:
        if not line:
            if not (self._data or self._event or self._last_id or self._retry is not None):
                return None
            data = "\n".join(self._data)
            self._data, self._event, self._retry = [], "", None  # the last id stays, as the spec says
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None
