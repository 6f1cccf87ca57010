"""Batch transform on the tiny Llama: formats, order, errors, filters, and kill -9 → resume."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from twinserve.jobs.batch_engine import EngineTarget, Outcome, RecordIds
from twinserve.jobs.batch_spec import JobRecord, JobStatus, TransformJob, TransformJobConfig
from twinserve.jobs.checkpoints import JobDir
from twinserve.jobs.records import ParsedRecord
from twinserve.jobs.transform import build_target, run_job

REPO = Path(__file__).resolve().parents[3]
WORDS = ["the quick", "hello world", "once upon a time", "to be or not", "a dragon and", "general kenobi"]


class CountingTarget:
    """The shared engine target, counting the records it runs (and never closed by a job)."""

    def __init__(self, inner: EngineTarget) -> None:
        self.inner = inner
        self.runs = 0

    async def run(self, parsed: ParsedRecord, ids: RecordIds, parameters: dict[str, Any]) -> Outcome:
        self.runs += 1
        return await self.inner.run(parsed, ids, parameters)

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def engine_target(tiny_model_dir: Path) -> Iterator[EngineTarget]:
    cfg = _config(tiny_model_dir, "x", "x")
    target = build_target(cfg)
    assert isinstance(target, EngineTarget)
    yield target
    asyncio.run(target.close())


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _config(model: Path, input_: str | Path, output: str | Path, **kw: Any) -> TransformJobConfig:
    values = {
        "name": "job",
        "model": str(model),
        "input": str(input_),
        "output": str(output),
        "dtype": "float32",
        "device": "cpu",
        "num_threads": 2,
        **kw,
    }
    return TransformJobConfig.model_validate(values)


def _create(cfg: TransformJobConfig, created: float | None = None) -> JobDir:
    job = JobDir(cfg.name)
    state = (
        TransformJob(name=cfg.name) if created is None else TransformJob(name=cfg.name, creation_time=created)
    )
    job.save(JobRecord(config=cfg, state=state))
    return job


def _lines(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_every_format_in_input_order_with_failures_by_line(
    engine_target: EngineTarget, tiny_model_dir: Path, tmp_path: Path, home: Path
) -> None:
    records: list[str] = []
    for i in range(24):
        records.append(
            json.dumps({"inputs": f"{WORDS[i % 6]} {i}", "parameters": {"max_new_tokens": 2 + i % 5}})
        )
    records += [
        json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}),
        "a plain text prompt",
        '{"inputs": "broken',  # line 27
        json.dumps({"prompt": "the quick", "max_tokens": 2, "n": 2}),
        json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 5000}}),  # line 29: over the limit
        json.dumps(
            {"custom_id": "c-1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}
        ),  # line 30: fails at run time, still one line in .out
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(records) + "\n")
    cfg = _config(
        tiny_model_dir,
        source,
        tmp_path / "out",
        max_concurrent_transforms=8,
        parameters={"max_new_tokens": 3},
    )
    _create(cfg)
    state = run_job("job", target=CountingTarget(engine_target))
    assert state.status is JobStatus.COMPLETED_WITH_ERRORS
    assert (state.records_succeeded, state.records_failed, state.records_total) == (27, 3, 30)
    out = _lines(tmp_path / "out" / "in.jsonl.out")
    assert len(out) == 28  # 27 answers + the OpenAI batch error line, in input order
    for i in range(24):  # TGI records as /invocations answers them: the prompt comes back first
        assert out[i][0]["generated_text"].startswith(f"{WORDS[i % 6]} {i}")
    assert out[24]["object"] == "chat.completion" and out[24]["usage"]["completion_tokens"] <= 3
    assert out[25][0]["generated_text"].startswith("a plain text prompt")
    assert [c["index"] for c in out[26]["choices"]] == [0, 1] and out[26]["object"] == "text_completion"
    assert out[27]["custom_id"] == "c-1" and out[27]["response"]["status_code"] == 400
    errors = _lines(tmp_path / "out" / "in.jsonl.err")
    assert [e["line"] for e in errors] == [27, 29, 30]
    assert errors[0]["error"].startswith("the body is not valid JSON")
    assert errors[1]["error"].startswith("`inputs` tokens + `max_new_tokens` must be <= 2048")
    assert errors[2]["error"] == "`messages` must not be empty"
    assert state.generated_tokens > 0 and state.prompt_tokens > 0


def test_a_folder_with_filters_and_join(
    engine_target: EngineTarget, tiny_model_dir: Path, tmp_path: Path, home: Path
) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"id": 1, "req": {"inputs": "hello"}}) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"id": 2, "req": {"inputs": "the quick"}}) + "\n")
    cfg = _config(
        tiny_model_dir,
        folder,
        tmp_path / "out",
        input_filter="$.req",
        join_source="Input",
        output_filter="$['id','SageMakerOutput']",
        parameters={"max_new_tokens": 2, "return_full_text": False},
    )
    _create(cfg)
    assert run_job("job", target=CountingTarget(engine_target)).status is JobStatus.COMPLETED
    a, b = _lines(tmp_path / "out" / "a.jsonl.out"), _lines(tmp_path / "out" / "b.jsonl.out")
    assert a[0]["id"] == 1 and set(a[0]) == {"id", "SageMakerOutput"}
    assert b[0]["id"] == 2 and "generated_text" in b[0]["SageMakerOutput"][0]
    assert not (tmp_path / "out" / "a.jsonl.err").exists()  # no failures, no .err


def test_openai_batch_file(
    engine_target: EngineTarget, tiny_model_dir: Path, tmp_path: Path, home: Path
) -> None:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": WORDS[i % 6]}],
                "max_tokens": 3,
                "temperature": 0,
            },
        }
        for i in range(5)
    ]
    source = tmp_path / "batch.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    _create(_config(tiny_model_dir, source, tmp_path / "out", record_format="openai-batch"))
    assert run_job("job", target=CountingTarget(engine_target)).status is JobStatus.COMPLETED
    out = _lines(tmp_path / "out" / "batch.jsonl.out")
    assert [o["custom_id"] for o in out] == [f"r{i}" for i in range(5)]
    assert all(o["error"] is None and o["response"]["status_code"] == 200 for o in out)
    assert out[0]["response"]["body"]["object"] == "chat.completion"
    assert len({o["id"] for o in out}) == 5


def _kill_resume_input(path: Path) -> None:
    records = []
    for i in range(48):
        if i % 3 == 0:
            records.append(json.dumps({"messages": [{"role": "user", "content": f"{WORDS[i % 6]} {i}"}]}))
        elif i % 3 == 1:
            records.append(json.dumps({"inputs": f"{WORDS[i % 6]} {i}"}))
        else:
            records.append(f"{WORDS[i % 6]} number {i}")
    records.insert(10, "{not json")
    path.write_text("\n".join(records) + "\n")


def test_killed_mid_run_then_resumed_is_byte_identical(
    engine_target: EngineTarget, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.jsonl"
    _kill_resume_input(source)
    params = {"max_new_tokens": 24, "ignore_eos": True}
    created = time.time()
    # the uninterrupted run, in its own home (same job name and creation time: same ids)
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path / "home-a"))
    ref = _config(tiny_model_dir, source, tmp_path / "out-a", parameters=params, max_concurrent_transforms=4)
    _create(ref, created)
    assert run_job("job", target=CountingTarget(engine_target)).status is JobStatus.COMPLETED_WITH_ERRORS

    home_b = tmp_path / "home-b"
    monkeypatch.setenv("TWINSERVE_HOME", str(home_b))
    changes = {
        "output": str(tmp_path / "out-b"),
        "checkpoint_every_records": 2,
        "max_concurrent_transforms": 2,
    }
    cfg = ref.model_copy(update=changes)  # slower, so that it is still running when killed
    job = _create(cfg, created)
    env = {**os.environ, "TWINSERVE_HOME": str(home_b), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "twinserve.cli.batch", "run-worker", "job"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    committed = _wait_for_commits(job, proc, at_least=8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert 8 <= committed < 49, "the job should be killed mid-run"
    assert job.load().state.status is JobStatus.IN_PROGRESS  # killed: no final state
    assert not job.is_running()

    resume_from = job.load_checkpoint().files["in.jsonl"].records
    counting = CountingTarget(engine_target)
    state = run_job("job", target=counting)
    assert state.status is JobStatus.COMPLETED_WITH_ERRORS
    # committed records are not redone (record 10 is the malformed one: it never runs)
    assert counting.runs == 49 - resume_from - (resume_from <= 10)
    assert state.records_succeeded == 48 and state.records_failed == 1 and state.runs == 2
    for suffix in (".out", ".err"):
        a = (tmp_path / "out-a" / f"in.jsonl{suffix}").read_bytes()
        b = (tmp_path / "out-b" / f"in.jsonl{suffix}").read_bytes()
        assert a == b, suffix


def _wait_for_commits(job: JobDir, proc: subprocess.Popen[bytes], *, at_least: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the runner exited before it could be killed"
        try:
            files = job.load_checkpoint().files
        except ValueError:  # pragma: no cover - the checkpoint is replaced atomically
            files = {}
        if "in.jsonl" in files and files["in.jsonl"].records >= at_least:
            return files["in.jsonl"].records
        time.sleep(0.01)
    raise AssertionError("no checkpoint within 60 s")


class FakeTransport:
    """An endpoint that answers from a script: (status, body) per call, recording what it got."""

    def __init__(self, answers: list[tuple[int, Any]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def asend(self, path: str, payload: dict[str, Any]) -> Any:
        from twinserve.client.transport import Response

        self.calls.append((path, dict(payload)))
        status, body = self.answers.pop(0)
        return Response(status, {"retry-after": "0"}, json.dumps(body).encode())

    async def aclose(self) -> None:
        pass


def test_endpoint_records_go_to_invocations_with_the_jobs_defaults(tmp_path: Path, home: Path) -> None:
    from twinserve.client._retry import RetryPolicy
    from twinserve.jobs.batch_endpoint import EndpointTarget

    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"inputs": "a", "parameters": {"max_new_tokens": 2}})
        + "\nplain\n"
        + json.dumps({"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": []}})
        + "\n"
    )
    transport = FakeTransport(
        [
            (429, {"error": "Model is overloaded", "error_type": "overloaded"}),  # retried
            (200, [{"generated_text": "a!", "details": {"generated_tokens": 2}}]),
            (200, [{"generated_text": "plain!"}]),
            (400, {"error": {"message": "`messages` must not be empty", "type": "invalid_request_error"}}),
        ]
    )
    target = EndpointTarget(transport, RetryPolicy(max_retries=2, backoff_base=0.0))  # type: ignore[arg-type]
    cfg = TransformJobConfig(
        name="job",
        endpoint="twin",
        input=str(source),
        output=str(tmp_path / "out"),
        max_concurrent_transforms=1,
        parameters={"max_new_tokens": 7, "temperature": 0.5},
    )
    _create(cfg)
    state = run_job("job", target=target)
    assert (state.status, state.records_succeeded, state.records_failed) == (
        JobStatus.COMPLETED_WITH_ERRORS,
        2,
        1,
    )
    assert [path for path, _ in transport.calls] == ["/invocations"] * 3 + ["/v1/chat/completions"]
    assert transport.calls[1][1]["parameters"] == {
        "max_new_tokens": 2,
        "temperature": 0.5,
    }  # the record's win
    assert transport.calls[2][1] == {
        "inputs": "plain",
        "parameters": {"max_new_tokens": 7, "temperature": 0.5},
    }
    assert transport.calls[3][1] == {"messages": [], "max_tokens": 7, "temperature": 0.5}
    out = _lines(tmp_path / "out" / "in.jsonl.out")
    assert out[0] == [{"generated_text": "a!", "details": {"generated_tokens": 2}}]  # as the endpoint said
    assert out[2]["error"]["message"] == "line 3: `messages` must not be empty"
    assert state.generated_tokens == 2


def test_stop_a_running_job_then_resume_it(
    engine_target: EngineTarget, tiny_model_dir: Path, tmp_path: Path, home: Path
) -> None:
    import threading

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"inputs": f"{WORDS[i % 6]} {i}"}) + "\n" for i in range(40)))
    params = {"max_new_tokens": 24, "ignore_eos": True}
    cfg = _config(
        tiny_model_dir,
        source,
        tmp_path / "out",
        parameters=params,
        max_concurrent_transforms=2,
        checkpoint_every_records=2,
    )
    job = _create(cfg)
    ended: list[TransformJob] = []
    runner = threading.Thread(
        target=lambda: ended.append(run_job("job", target=CountingTarget(engine_target)))
    )
    runner.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and job.load_checkpoint().files.get("in.jsonl", None) is None:
        time.sleep(0.01)
    job.stop_path.touch()
    runner.join(30)
    assert ended[0].status is JobStatus.STOPPED and ended[0].records_done < 40
    assert run_job("job", target=CountingTarget(engine_target)).status is JobStatus.COMPLETED
    out = _lines(tmp_path / "out" / "in.jsonl.out")
    assert len(out) == 40
    assert all(o[0]["generated_text"].startswith(f"{WORDS[i % 6]} {i}") for i, o in enumerate(out))


def test_s3_input_prefix_and_output(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto import mock_aws

    from twinserve.jobs import s3 as jobs_s3
    from twinserve.jobs.batch_endpoint import EndpointTarget

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with mock_aws():
        jobs_s3.reset_default_client()
        client = jobs_s3.s3_client()
        client.create_bucket(Bucket="data")
        client.put_object(Bucket="data", Key="in/a.jsonl", Body=b'{"inputs": "x"}\n')
        client.put_object(Bucket="data", Key="in/b.jsonl", Body=b"y\n{bad\n")
        transport = FakeTransport([(200, [{"generated_text": "x!"}]), (200, [{"generated_text": "y!"}])])
        cfg = TransformJobConfig(
            name="job",
            endpoint="twin",
            input="s3://data/in/",
            output="s3://data/out",
            max_concurrent_transforms=1,
        )
        _create(cfg)
        state = run_job("job", target=EndpointTarget(transport))  # type: ignore[arg-type]
        assert (state.status, state.records_succeeded, state.records_failed) == (
            JobStatus.COMPLETED_WITH_ERRORS,
            2,
            1,
        )
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="data", Prefix="out/")["Contents"])
        assert keys == ["out/a.jsonl.out", "out/b.jsonl.err", "out/b.jsonl.out"]
        body = client.get_object(Bucket="data", Key="out/b.jsonl.out")["Body"].read()
        assert body == b'[{"generated_text":"y!"}]\n'
    jobs_s3.reset_default_client()
