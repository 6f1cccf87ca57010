"""What a batch job writes for a record: its answer line, or its failure.

SageMaker's order: the answer, then JoinSource (the input record with the answer under
`SageMakerOutput`), then OutputFilter (JSONPath). OpenAI batch lines are wrapped as the
OpenAI Batch API and `vllm run-batch` write them,
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`, and a
failed one still gets its line in `.out` (with `error` set), so the output has a line for
every input line. Every failure is also in `.err`, with its line number and the reason in
the words of the server's error answer for that protocol.
"""

from __future__ import annotations

import json
from typing import Any

from twinserve.errors import TwinserveError
from twinserve.jobs.batch_engine import Outcome, RecordIds
from twinserve.jobs.batch_spec import TransformJobConfig
from twinserve.jobs.records import InputRecord, ParsedRecord, custom_id_of, looks_like_openai_batch, select
from twinserve.server.errors import error_body, status_for


def dumps(value: Any) -> bytes:
    """Compact, key order kept, UTF-8 as is: the same value always gives the same bytes."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def success_line(cfg: TransformJobConfig, parsed: ParsedRecord, outcome: Outcome, ids: RecordIds) -> bytes:
    """The `.out` line of an answered record (ValidationError when the output filter fails)."""
    value: Any = outcome.answer
    if parsed.openai_batch:
        value = {
            "id": f"batch_req_{ids.key}",
            "custom_id": parsed.custom_id,
            "response": {"status_code": outcome.status_code, "request_id": ids.request_id, "body": value},
            "error": None,
        }
    if cfg.join_source == "Input":
        value = joined(parsed.source, value)
    return dumps(select(cfg.output_filter, value, what="output_filter")) + cfg.newline


def joined(source: Any, answer: Any) -> Any:
    """SageMaker's JoinSource=Input for JSON: the input object plus `SageMakerOutput`."""
    if isinstance(source, dict):
        return {**source, "SageMakerOutput": answer}
    return {"SageMakerInput": source, "SageMakerOutput": answer}


def failure_lines(
    cfg: TransformJobConfig,
    record: InputRecord,
    parsed: ParsedRecord | None,
    error: TwinserveError,
    ids: RecordIds,
) -> tuple[bytes | None, bytes]:
    """(the `.out` line, for OpenAI batch records only; the `.err` line)."""
    if parsed is not None:
        openai_batch, wire, custom_id = parsed.openai_batch, parsed.wire, parsed.custom_id
    else:  # it failed to parse: an OpenAI batch line still gets its error line in `.out`
        custom_id = custom_id_of(record)
        openai_batch = cfg.record_format == "openai-batch" or (
            cfg.record_format == "auto" and looks_like_openai_batch(record)
        )
        wire = "openai" if openai_batch else "tgi"
    status = status_for(error, wire)
    body = error_body(error, wire).model_dump(mode="json")
    message = body["error"]["message"] if wire == "openai" else body["error"]
    err: dict[str, Any] = {"line": record.line, "record": record.index}
    if custom_id is not None:
        err["custom_id"] = custom_id
    err.update({"status_code": status, "error_type": error.error_type, "error": message})
    out = None
    if openai_batch:
        code = body["error"].get("code") if wire == "openai" else error.error_type
        out_value = {
            "id": f"batch_req_{ids.key}",
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": ids.request_id, "body": body},
            "error": {"code": str(code), "message": f"line {record.line}: {message}"},
        }
        out = dumps(out_value) + cfg.newline
    return out, dumps(err) + b"\n"
