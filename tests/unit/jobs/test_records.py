"""Reading batch records: formats, filters, line numbers and the server's error wording."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twinserve.errors import PayloadTooLargeError, ValidationError
from twinserve.jobs.batch_engine import Outcome, RecordIds
from twinserve.jobs.batch_output import failure_lines, success_line
from twinserve.jobs.batch_spec import TransformJobConfig
from twinserve.jobs.records import InputRecord, RecordFailure, iter_records, parse_record, select


def _record(value: object, index: int = 0, line: int = 1) -> InputRecord:
    raw = (
        value
        if isinstance(value, bytes)
        else (value if isinstance(value, str) else json.dumps(value)).encode()
    )
    return InputRecord(index, line, raw)


def _cfg(**kw: object) -> TransformJobConfig:
    return TransformJobConfig.model_validate({"name": "j", "model": "m", "input": "i", "output": "o", **kw})


def test_iter_records_skips_blank_lines_and_numbers_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"inputs": "a"}\n\n  \n"b"\r\nc\n')
    got = list(iter_records(path, split_type="Line"))
    assert [(r.index, r.line, r.raw) for r, _, _ in got] == [
        (0, 1, b'{"inputs": "a"}'),
        (1, 4, b'"b"'),
        (2, 5, b"c"),
    ]
    # resuming from a record's end offset gives the records after it, numbered on
    _, offset, line = got[0]
    rest = list(iter_records(path, split_type="Line", offset=offset, index=1, line=line))
    assert [(r.index, r.line) for r, _, _ in rest] == [(1, 4), (2, 5)]


def test_split_type_none_makes_the_file_one_record(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_bytes(b'{\n  "inputs": "x"\n}\n')
    ((record, end, _),) = list(iter_records(path, split_type="None"))
    assert record.raw == b'{\n  "inputs": "x"\n}' and end == path.stat().st_size
    assert parse_record(record, record_format="auto").kind == "tgi"


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ({"inputs": "hi", "parameters": {"max_new_tokens": 3}}, "tgi"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
        ({"prompt": "hi"}, "completion"),
        ("just a line of text", "text"),
        ('"a JSON string"', "text"),
    ],
)
def test_auto_detects_each_format(value: object, kind: str) -> None:
    parsed = parse_record(_record(value), record_format="auto")
    assert parsed.kind == kind
    if kind == "text":
        assert parsed.body["inputs"] in ("just a line of text", "a JSON string")


def test_openai_batch_line() -> None:
    line = {
        "custom_id": "r-1",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": "hi", "max_tokens": 2},
    }
    parsed = parse_record(_record(line), record_format="auto")
    assert (parsed.kind, parsed.custom_id, parsed.openai_batch) == ("completion", "r-1", True)
    assert parsed.body == {"prompt": "hi", "max_tokens": 2}


def test_openai_batch_line_with_an_unknown_url_fails_with_the_field() -> None:
    line = {"custom_id": "r-2", "method": "POST", "url": "/v1/embeddings", "body": {}}
    with pytest.raises(RecordFailure) as caught:
        parse_record(_record(line, index=4, line=9), record_format="openai-batch")
    assert "`url`" in caught.value.error.message and caught.value.record.line == 9


def test_malformed_json_fails_with_the_servers_422_text() -> None:
    with pytest.raises(RecordFailure) as caught:
        parse_record(_record('{"inputs": "x"', line=3), record_format="auto")
    assert isinstance(caught.value.error, ValidationError)
    assert caught.value.error.message.startswith("the body is not valid JSON:")


def test_a_body_with_no_known_field_fails_as_invocations_does() -> None:
    with pytest.raises(RecordFailure) as caught:
        parse_record(_record({"question": "x"}), record_format="auto")
    assert "needs `inputs` (TGI), `messages` (chat) or `prompt`" in caught.value.error.message


def test_a_record_over_the_payload_limit_fails_alone() -> None:
    with pytest.raises(RecordFailure) as caught:
        parse_record(_record({"inputs": "x" * 100}), record_format="auto", max_payload_bytes=50)
    assert isinstance(caught.value.error, PayloadTooLargeError)


def test_input_filter_selects_the_request() -> None:
    record = _record({"id": 7, "payload": {"inputs": "hello"}})
    parsed = parse_record(record, record_format="auto", input_filter="$.payload")
    assert parsed.kind == "tgi" and parsed.body == {"inputs": "hello"}
    assert parsed.source == {"id": 7, "payload": {"inputs": "hello"}}  # kept for JoinSource
    as_text = parse_record(_record({"id": 7, "q": "why?"}), record_format="auto", input_filter="$.q")
    assert as_text.kind == "text" and as_text.body == {"inputs": "why?"}
    with pytest.raises(RecordFailure, match="matched nothing"):
        parse_record(_record({"id": 7}), record_format="auto", input_filter="$.q")


def test_select_several_fields_makes_an_object() -> None:
    value = {"id": 1, "SageMakerOutput": {"x": 2}, "other": 3}
    assert select("$['id','SageMakerOutput']", value, what="f") == {"id": 1, "SageMakerOutput": {"x": 2}}
    assert select("$[0].generated_text", [{"generated_text": "t"}], what="f") == "t"


def test_bad_jsonpath_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="invalid JSONPath"):
        _cfg(input_filter="$.[")
    with pytest.raises(ValueError, match="exactly one of"):
        TransformJobConfig.model_validate({"name": "j", "input": "i", "output": "o"})
    with pytest.raises(ValueError):
        _cfg(name="Not_A_Label")


def test_join_and_output_filter_in_sagemakers_order() -> None:
    cfg = _cfg(join_source="Input", output_filter="$['id','SageMakerOutput']")
    parsed = parse_record(_record({"id": 5, "inputs": "q"}), record_format="auto")
    line = success_line(cfg, parsed, Outcome(answer=[{"generated_text": "a"}]), RecordIds("k", 0))
    assert json.loads(line) == {"id": 5, "SageMakerOutput": [{"generated_text": "a"}]}
    assert line.endswith(b"\n")
    assembled = success_line(_cfg(assemble_with="None"), parsed, Outcome(answer="x"), RecordIds("k", 0))
    assert assembled == b'"x"'


def test_failure_lines_name_the_line_and_wrap_openai_batch_errors() -> None:
    cfg = _cfg()
    record = _record({"custom_id": "c9", "method": "POST", "body": {"messages": []}})  # no url
    with pytest.raises(RecordFailure) as caught:
        parse_record(record, record_format="auto")
    parsed = None
    out, err = failure_lines(
        cfg, InputRecord(2, 3, record.raw), parsed, caught.value.error, RecordIds("k", 0)
    )
    assert out is not None
    batch_line = json.loads(out)
    assert batch_line["custom_id"] == "c9" and batch_line["response"]["status_code"] == 400
    assert batch_line["error"]["message"].startswith("line 3: ")
    assert json.loads(err) == {
        "line": 3,
        "record": 2,
        "custom_id": "c9",
        "status_code": 400,
        "error_type": "validation",
        "error": batch_line["response"]["body"]["error"]["message"],
    }
    tgi_out, tgi_err = failure_lines(
        cfg, _record("x", line=4), None, ValidationError("bad"), RecordIds("k", 0)
    )
    assert tgi_out is None and json.loads(tgi_err)["status_code"] == 422
