"""Batch transform on the real default model: 50 chat records, 3 of them malformed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twinserve.jobs.batch_spec import JobRecord, JobStatus, TransformJob, TransformJobConfig
from twinserve.jobs.checkpoints import JobDir
from twinserve.jobs.transform import run_job

pytestmark = pytest.mark.integration

QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Who wrote Hamlet?"]
MALFORMED = {7: '{"messages": [', 23: '{"inputs": 3}', 41: "{not json at all"}


def test_fifty_records_three_malformed(
    default_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path / "home"))
    lines = []
    for i in range(50):
        question = f"{QUESTIONS[i % 4]} ({i})"
        record = {"id": i, "messages": [{"role": "user", "content": question}]}
        lines.append(MALFORMED.get(i + 1) or json.dumps(record))
    source = tmp_path / "questions.jsonl"
    source.write_text("\n".join(lines) + "\n")
    cfg = TransformJobConfig(
        name="default-model",
        model=str(default_model_path),
        input=str(source),
        output=str(tmp_path / "out"),
        parameters={"max_new_tokens": 8},
        join_source="Input",
        output_filter="$['id','SageMakerOutput']",
    )
    JobDir(cfg.name).save(JobRecord(config=cfg, state=TransformJob(name=cfg.name)))
    state = run_job(cfg.name)
    assert state.status is JobStatus.COMPLETED_WITH_ERRORS, state.failure_reason
    assert (state.records_succeeded, state.records_failed) == (47, 3)
    out = [json.loads(line) for line in (tmp_path / "out" / "questions.jsonl.out").read_text().splitlines()]
    assert len(out) == 47
    assert [o["id"] for o in out] == [i for i in range(50) if i + 1 not in MALFORMED]  # input order
    answers = [o["SageMakerOutput"] for o in out]
    assert all(a["object"] == "chat.completion" and a["usage"]["completion_tokens"] <= 8 for a in answers)
    assert all(a["choices"][0]["message"]["content"] for a in answers)
    errors = [
        json.loads(line) for line in (tmp_path / "out" / "questions.jsonl.err").read_text().splitlines()
    ]
    assert [e["line"] for e in errors] == sorted(MALFORMED)
    assert errors[1]["error"].startswith("`inputs`")  # the TGI schema's own wording
