"""`twinserve batch …` on the tiny Llama: the happy path, stop/resume, and errors before start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twinserve.cli.main import app
from twinserve.jobs.batch_spec import JobRecord, JobStatus, TransformJob, TransformJobConfig
from twinserve.jobs.checkpoints import JobDir

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    rows = [json.dumps({"inputs": f"hello {i}"}) for i in range(6)] + ["{oops", "the quick brown fox"]
    path.write_text("\n".join(rows) + "\n")
    return path


def _create(*args: str) -> list[str]:
    return ["batch", "create", *args, "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "3"]


def test_create_in_the_foreground_then_describe_list_logs(
    home: Path, source: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = _create("j1", "--model", str(tiny_model_dir), "--input", str(source), "--output", str(out))
    result = runner.invoke(app, [*args, "--foreground"])
    assert result.exit_code == 0, result.output
    assert "CompletedWithErrors, 7 ok, 1 failed" in result.output
    assert len((out / "in.jsonl.out").read_text().splitlines()) == 7
    assert json.loads((out / "in.jsonl.err").read_text())["line"] == 7

    described = runner.invoke(app, ["batch", "describe", "j1", "--json"])
    assert described.exit_code == 0, described.output
    value = json.loads(described.output)
    assert value["status"] == "CompletedWithErrors" and value["records_failed"] == 1
    assert value["generated_tokens"] > 0 and value["transform_seconds"] > 0
    assert "j1" in runner.invoke(app, ["batch", "list"]).output
    assert "job started" in runner.invoke(app, ["batch", "logs", "j1"]).output
    assert "nothing to resume" in runner.invoke(app, ["batch", "resume", "j1"]).output
    again = runner.invoke(app, [*args, "--foreground"])
    assert again.exit_code == 1 and "exists" in again.output


def test_detached_create_with_wait(home: Path, source: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(
        app, _create("j2", "--model", str(tiny_model_dir), "--input", str(source), "--output", str(out))
    )
    assert result.exit_code == 0, result.output
    assert JobDir("j2").load().state.status is JobStatus.COMPLETED_WITH_ERRORS
    assert JobDir("j2").load().state.pid is None
    waited = runner.invoke(app, ["batch", "wait", "j2"])
    assert waited.exit_code == 0 and "7 ok, 1 failed" in waited.output


def test_stop_a_dead_job_then_resume_it(
    home: Path, source: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = TransformJobConfig(
        name="j3",
        model=str(tiny_model_dir),
        input=str(source),
        output=str(tmp_path / "out"),
        dtype="float32",
        device="cpu",
        parameters={"max_new_tokens": 2},
    )
    JobDir("j3").save(JobRecord(config=cfg, state=TransformJob(name="j3")))  # as a killed runner leaves it
    assert "not running" in runner.invoke(app, ["batch", "describe", "j3"]).output
    stopped = runner.invoke(app, ["batch", "stop", "j3"])
    assert stopped.exit_code == 0 and "marked Stopped" in stopped.output
    assert runner.invoke(app, ["batch", "wait", "j3"]).exit_code == 1  # stopped is not done
    resumed = runner.invoke(app, ["batch", "resume", "j3", "--foreground"])
    assert resumed.exit_code == 0, resumed.output
    assert JobDir("j3").load().state.status is JobStatus.COMPLETED_WITH_ERRORS


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        ({"--input": "missing.jsonl"}, 1, "does not exist"),
        ({"--model": "/no/such/model"}, 1, "no such folder"),
        ({"--input-filter": "$.["}, 2, "invalid JSONPath"),
        ({"--output": "/proc/forbidden"}, 2, "not writable"),
        ({"--endpoint": "nope"}, 2, "exactly one of"),
        ({"--format": "xml"}, 2, "record_format"),
        ({"--param": "novalue"}, 2, "KEY=VALUE"),
    ],
)
def test_errors_before_anything_starts(
    home: Path,
    source: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    extra: dict[str, str],
    code: int,
    message: str,
) -> None:
    flags = {
        "--model": str(tiny_model_dir),
        "--input": str(source),
        "--output": str(tmp_path / "out"),
        **extra,
    }
    args = [item for pair in flags.items() for item in pair]
    result = runner.invoke(app, ["batch", "create", "bad", *args, "--foreground"])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not JobDir("bad").exists()


def test_unknown_job_and_unknown_endpoint(home: Path, source: Path, tmp_path: Path) -> None:
    assert runner.invoke(app, ["batch", "describe", "ghost"]).exit_code == 1
    result = runner.invoke(
        app,
        [
            "batch",
            "create",
            "e1",
            "--endpoint",
            "ghost",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1 and "ghost" in result.output
