"""Input records of a batch transform: reading them, filtering them, telling their protocol.

A record is one line (SplitType Line) or one whole file (SplitType None). Each becomes one
`ParsedRecord`: the body a server route would take (TGI `{"inputs", "parameters"}`, chat
`{"messages"}`, completion `{"prompt"}`), or a plain text prompt, or an OpenAI batch line
(`{"custom_id", "method", "url", "body"}`, as the OpenAI Batch API and `vllm run-batch` read
them). Parsing is the server's own: JSON through `decode_json_body`, bodies through the
protocol schemas, so a bad record fails with the text the server's 422 would give, and only
that record fails; the job goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from twinserve.errors import PayloadTooLargeError, TwinserveError, ValidationError
from twinserve.server.json_body import decode_json_body
from twinserve.server.protocol.validation import validation_error

Kind = Literal["tgi", "chat", "completion", "text"]
OPENAI_BATCH_URLS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


@dataclass(frozen=True)
class InputRecord:
    """One record as read: its 0-based number in the file, its 1-based first line, its bytes."""

    index: int
    line: int
    raw: bytes


@dataclass
class ParsedRecord:
    """What runs for one record: a protocol body, and where it came from (for join and errors)."""

    kind: Kind
    body: dict[str, Any]
    source: Any  # the decoded record (for JoinSource=Input)
    custom_id: str | None = None  # OpenAI batch lines only
    url: str | None = None
    openai_batch: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wire(self) -> Literal["tgi", "openai"]:
        """Which protocol's error wording this record gets (as the matching route would)."""
        return "openai" if self.kind in ("chat", "completion") else "tgi"


class RecordFailure(Exception):
    """A record that cannot run: its line number and the server's reason."""

    def __init__(
        self, error: TwinserveError, record: InputRecord, parsed: ParsedRecord | None = None
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.record = record
        self.parsed = parsed


class OpenAIBatchLine(BaseModel):
    """One line of an OpenAI batch input file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"] = "POST"
    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]


# ------------------------------------------------------------------ reading
def iter_records(
    path: Path, *, split_type: str, offset: int = 0, index: int = 0, line: int = 1
) -> Iterator[tuple[InputRecord, int, int]]:
    """Records from byte `offset` on (numbered from `index`, lines from `line`), each with the
    byte offset and line number just after it, which a checkpoint stores to resume there.

    Blank lines are not records (a trailing newline, spacing in a JSONL file).
    """
    with path.open("rb") as f:
        if split_type == "None":
            if offset == 0:
                raw = f.read()
                yield InputRecord(index, line, raw.rstrip(b"\r\n")), len(raw), line + raw.count(b"\n")
            return
        f.seek(offset)
        for chunk in f:
            start_line = line
            offset += len(chunk)
            line += 1
            text = chunk.rstrip(b"\r\n")
            if not text.strip():
                continue
            yield InputRecord(index, start_line, text), offset, line
            index += 1


def count_records(path: Path, split_type: str) -> int:
    """Records in a file (a quick scan, for the progress bar's ETA)."""
    if split_type == "None":
        return 1
    with path.open("rb") as f:
        return sum(1 for chunk in f if chunk.strip())


# ------------------------------------------------------------------ JSONPath
def compile_jsonpath(expr: str) -> Any:
    """The parsed expression; ValueError with the parser's reason for a bad one."""
    from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
    from jsonpath_ng.ext import parse

    try:
        return parse(expr)
    except (JsonPathParserError, JsonPathLexerError, Exception) as exc:
        raise ValueError(f"invalid JSONPath {expr!r}: {exc}") from exc


def select(expr: str | None, value: Any, *, what: str) -> Any:
    """SageMaker's filter: one match is the value itself; several fields (`$['a','b']`) an
    object of them; other multiple matches a list. No match fails the record."""
    if expr is None:
        return value
    matches = compile_jsonpath(expr).find(value)
    if not matches:
        raise ValidationError(f"{what} {expr!r} matched nothing in the record")
    if len(matches) == 1:
        return matches[0].value
    names = [str(m.path.fields[0]) for m in matches if hasattr(m.path, "fields") and len(m.path.fields) == 1]
    if len(names) == len(matches) and len(set(names)) == len(names):
        return {name: m.value for name, m in zip(names, matches, strict=True)}
    return [m.value for m in matches]


# ------------------------------------------------------------------- parsing
def parse_record(
    record: InputRecord,
    *,
    record_format: str,
    input_filter: str | None = None,
    max_payload_bytes: int | None = None,
) -> ParsedRecord:
    """The record's protocol body; RecordFailure (with the server's wording) when it has none."""
    try:
        if max_payload_bytes is not None and len(record.raw) > max_payload_bytes:
            raise PayloadTooLargeError(
                f"record is larger than the payload limit ({max_payload_bytes} bytes): {len(record.raw)} bytes"
            )
        return _parse(record, record_format, input_filter)
    except TwinserveError as exc:
        raise RecordFailure(exc, record) from exc


def _parse(record: InputRecord, record_format: str, input_filter: str | None) -> ParsedRecord:
    if record_format == "text":
        return _text(_decode_text(record.raw), source=_decode_text(record.raw))
    if record_format == "auto" and not _looks_like_json(record.raw):
        text = _decode_text(record.raw)
        return _text(text, source=text)
    source = decode_json_body(record.raw)
    if record_format == "openai-batch" or (
        record_format == "auto"
        and isinstance(source, dict)
        and "custom_id" in source
        and ("body" in source or "url" in source)
    ):
        return _openai_batch(source, input_filter)
    value = select(input_filter, source, what="input_filter")
    if isinstance(value, str):
        if record_format not in ("auto", "tgi"):
            raise ValidationError(f"a {record_format} record must be a JSON object, not a string")
        return _text(value, source=source)
    if not isinstance(value, dict):
        raise ValidationError("a record must be a JSON object (or a string: a text prompt)")
    kind = _kind_of(value, record_format)
    return ParsedRecord(kind=kind, body=value, source=source)


def _kind_of(body: dict[str, Any], record_format: str) -> Kind:
    if record_format == "tgi":
        return "tgi"
    if record_format == "chat":
        return "chat"
    # the `/invocations` rules: messages → chat, prompt → completion, inputs → TGI
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completion"
    if "inputs" in body:
        return "tgi"
    raise ValidationError("the body needs `inputs` (TGI), `messages` (chat) or `prompt` (completion)")


def _openai_batch(source: Any, input_filter: str | None) -> ParsedRecord:
    if not isinstance(source, dict):
        raise ValidationError("an OpenAI batch line must be a JSON object")
    try:
        line = OpenAIBatchLine.model_validate(source)
    except PydanticValidationError as exc:
        raise validation_error(exc.errors()) from exc
    body = select(input_filter, line.body, what="input_filter")
    if not isinstance(body, dict):
        raise ValidationError("`body` must be a JSON object")
    return ParsedRecord(
        kind=OPENAI_BATCH_URLS[line.url],
        body=body,
        source=source,
        custom_id=line.custom_id,
        url=line.url,
        openai_batch=True,
    )


def _text(text: str, *, source: Any) -> ParsedRecord:
    if not text:
        raise ValidationError("`inputs` cannot be empty")
    return ParsedRecord(kind="text", body={"inputs": text}, source=source)


def _looks_like_json(raw: bytes) -> bool:
    return raw.lstrip()[:1] in (b"{", b"[", b'"')


def _decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("the record is not valid UTF-8") from exc


def _loose_json(record: InputRecord) -> Any:
    try:
        return json.loads(record.raw)
    except (ValueError, RecursionError):
        return None


def custom_id_of(record: InputRecord) -> str | None:
    """The `custom_id` of an OpenAI batch line that failed to parse as a whole, if it has one."""
    value = _loose_json(record)
    cid = value.get("custom_id") if isinstance(value, dict) else None
    return cid if isinstance(cid, str) else None


def looks_like_openai_batch(record: InputRecord) -> bool:
    """A line that meant to be an OpenAI batch request (it names a custom_id and a url or body)."""
    value = _loose_json(record)
    return isinstance(value, dict) and "custom_id" in value and ("url" in value or "body" in value)
