"""Batch transform on Ray Data (2 actors, the tiny Llama) against the local batch transform.

One Ray job runs from the CLI in a subprocess, a second driver joining the cluster at its
address; the same input then runs locally (same job name and creation time, so the same ids)
and both must write the same bytes. A resume from a killed run's checkpoint, and a model that
only the actors fail to load, run in this process (the suite's driver).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.ray.conftest import RayCluster
from twinserve.cli.main import app
from twinserve.jobs.batch_spec import JobRecord, JobStatus, TransformJob, TransformJobConfig
from twinserve.jobs.checkpoints import Checkpoint, FileCheckpoint, JobDir
from twinserve.jobs.transform import run_job

runner = CliRunner()

RECORDS = [
    json.dumps({"inputs": "the quick", "parameters": {"max_new_tokens": 7}}),
    json.dumps({"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 5}),
    json.dumps({"prompt": "once upon a time", "max_tokens": 4, "n": 2}),
    "a plain text prompt",
    '{"inputs": "broken',  # line 5: not JSON
    json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 5000}}),  # line 6: over the limit
    json.dumps({"inputs": "to be or not", "parameters": {"max_new_tokens": 8, "ignore_eos": True}}),
    "",  # a blank line is no record; the next is line 9
    json.dumps({"messages": [{"role": "user", "content": "general kenobi"}]}),
    json.dumps({"inputs": "a dragon and"}),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray-batch") / "in.jsonl"
    path.write_text("\n".join(RECORDS) + "\n")
    return path


def _cli_args(name: str, model: Path, source: Path, output: Path) -> list[str]:
    return [
        "batch",
        "create",
        name,
        "--model",
        str(model),
        "--input",
        str(source),
        "--output",
        str(output),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--max-new-tokens",
        "6",
    ]


def _run_locally(cfg: TransformJobConfig, created: float, output: Path, home: Path) -> Path:
    """The same job on the local platform, in its own home (same name and creation time)."""
    local = cfg.model_copy(update={"platform": "local", "ray": None, "output": str(output)})
    job = JobDir(cfg.name, home / "batch")
    job.save(JobRecord(config=local, state=TransformJob(name=cfg.name, creation_time=created)))
    state = run_job(cfg.name, home=home / "batch")
    assert state.status is JobStatus.COMPLETED_WITH_ERRORS, state.failure_reason
    return output


@pytest.fixture(scope="module")
def cli_job(
    ray_cluster: RayCluster, tiny_model_dir: Path, source: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A Ray job created and run by the CLI in a subprocess (a second driver, at the address),
    and the same job run locally for reference."""
    base = tmp_path_factory.mktemp("ray-cli")
    home, out = base / "home", base / "out-ray"
    args = _cli_args("job", tiny_model_dir, source, out)
    args += ["--platform", "ray", "--ray-address", ray_cluster.address, "--actors", "2", "--foreground"]
    env = {**os.environ, "TWINSERVE_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "twinserve.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    record = JobDir("job", home / "batch").load()
    local_out = _run_locally(
        record.config, record.state.creation_time, base / "out-local", base / "home-local"
    )
    return {"home": home, "out": out, "local_out": local_out, "record": record, "stdout": proc.stdout}


def test_the_cli_runs_a_ray_job_byte_identical_to_the_local_one(cli_job: dict[str, Any]) -> None:
    assert "job: CompletedWithErrors, 7 ok, 2 failed" in cli_job["stdout"]
    for suffix in (".out", ".err"):
        ray_bytes = (cli_job["out"] / f"in.jsonl{suffix}").read_bytes()
        local_bytes = (cli_job["local_out"] / f"in.jsonl{suffix}").read_bytes()
        assert ray_bytes == local_bytes, suffix
    out_lines = (cli_job["out"] / "in.jsonl.out").read_bytes().splitlines()
    assert len(out_lines) == 7  # every answered record, in input order
    assert json.loads(out_lines[0])[0]["generated_text"].startswith("the quick")
    assert json.loads(out_lines[-1])[0]["generated_text"].startswith("a dragon and")
    errors = [json.loads(line) for line in (cli_job["out"] / "in.jsonl.err").read_bytes().splitlines()]
    assert [(e["line"], e["record"]) for e in errors] == [(5, 4), (6, 5)]
    assert errors[0]["error"].startswith("the body is not valid JSON")


def test_describe_keeps_the_platform_and_shows_the_counts(
    cli_job: dict[str, Any], ray_cluster: RayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWINSERVE_HOME", str(cli_job["home"]))
    described = runner.invoke(app, ["batch", "describe", "job", "--json"])
    assert described.exit_code == 0, described.output
    value = json.loads(described.output)
    assert value["platform"] == "ray"
    assert value["ray"]["address"] == ray_cluster.address and value["ray"]["actors"] == 2
    assert value["status"] == "CompletedWithErrors"
    assert (value["records_total"], value["records_succeeded"], value["records_failed"]) == (9, 7, 2)
    assert value["generated_tokens"] > 0 and value["files"]["in.jsonl"]["done"]


def test_resume_from_a_killed_runs_checkpoint_runs_only_the_rest(
    cli_job: dict[str, Any], ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """State as a runner killed after 4 committed records leaves it (and half a line written
    after the commit): the resumed Ray run truncates that, runs the other 5, same bytes."""
    record: JobRecord = cli_job["record"]
    reference = (cli_job["local_out"] / "in.jsonl.out").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    head = b"".join(reference.splitlines(keepends=True)[:4])
    (out / "in.jsonl.out").write_bytes(head + b'[{"generated_text":"half a li')
    lines = Path(record.config.input).read_bytes().splitlines(keepends=True)
    checkpoint = FileCheckpoint(
        records=4,
        succeeded=4,
        input_offset=sum(len(line) for line in lines[:4]),
        input_line=5,
        out_offset=len(head),
    )
    job = JobDir("job", tmp_path / "batch")
    assert record.config.ray is not None
    one_actor = record.config.ray.model_copy(update={"actors": 1})  # enough here, and starts sooner
    cfg = record.config.model_copy(update={"output": str(out), "ray": one_actor})
    job.save(JobRecord(config=cfg, state=TransformJob(name="job", creation_time=record.state.creation_time)))
    job.save_checkpoint(Checkpoint(files={"in.jsonl": checkpoint}))

    state = run_job("job", home=tmp_path / "batch")
    assert state.status is JobStatus.COMPLETED_WITH_ERRORS, state.failure_reason
    assert (state.records_succeeded, state.records_failed) == (7, 2)
    assert (out / "in.jsonl.out").read_bytes() == reference
    assert (out / "in.jsonl.err").read_bytes() == (cli_job["local_out"] / "in.jsonl.err").read_bytes()
    assert "running 5 records" in job.log_path.read_text()  # only those after the checkpoint


def test_a_model_the_actors_cannot_load_fails_the_job_as_it_fails_locally(
    ray_cluster: RayCluster, source: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The folder is there (the driver pins it), its weights are not loadable: the actors say so,
    and the job fails with the reason a local job gives."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.suffix != ".safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    reasons = {}
    for platform in ("local", "ray"):
        cfg = TransformJobConfig(
            name="broken",
            model=str(broken),
            input=str(source),
            output=str(tmp_path / f"out-{platform}"),
            dtype="float32",
            device="cpu",
            platform=platform,
            ray={"actors": 1} if platform == "ray" else None,
        )
        home = tmp_path / platform
        JobDir("broken", home).save(JobRecord(config=cfg, state=TransformJob(name="broken")))
        state = run_job("broken", home=home)
        assert state.status is JobStatus.FAILED and state.records_done == 0
        reasons[platform] = state.failure_reason
    assert reasons["ray"] == reasons["local"]
    assert reasons["ray"] is not None and "SafetensorError" in reasons["ray"]


def test_a_job_no_node_has_room_for_is_refused_before_it_starts(
    ray_cluster: RayCluster,
    source: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path / "home"))
    args = _cli_args("nogpu", tiny_model_dir, source, tmp_path / "out")
    result = runner.invoke(app, [*args, "--platform", "ray", "--actor-gpus", "1", "--foreground"])
    assert result.exit_code == 2, result.output
    assert "no node of the Ray cluster has room for one actor (1 CPU, 1 GPU)" in result.output
    assert not JobDir("nogpu").exists()
