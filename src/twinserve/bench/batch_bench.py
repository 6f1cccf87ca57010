"""`twinserve bench batch`: a batch transform in-process vs the same records on a real-time server.

Both sides get the same chat records (the built-in questions), greedy, exactly
`max_new_tokens` each (`ignore_eos`), the same dtype and thread budget. The server side is
`twinserve serve` in a child process driven by `bench serve` at `concurrency` requests in
flight (streaming chat, as a real-time client calls it); the batch side is `run_job` on a
JSONL file, with `batch_concurrency` records in flight on one in-process engine. They run
one after the other, never together (2 cores: each must have the machine to itself), and
each side's clock excludes loading the model. Each side first runs one unmeasured wave at its
own concurrency (`warmup`): the first pass over new batch shapes costs several times a warm
one on CPU (kernel set-up per shape), which would otherwise swamp the comparison. Tokens are
the engine's and the server's own counts (`usage`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from twinserve.bench.prompts import chat_messages
from twinserve.bench.serve_bench import chat_workload, serve_bench
from twinserve.config import Dtype
from twinserve.jobs.batch_spec import JobRecord, TransformJob, TransformJobConfig
from twinserve.jobs.checkpoints import JobDir
from twinserve.jobs.transform import Target, run_job
from twinserve.server.process import ServerProcess

Progress = Callable[[str], None]


class BatchBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model folder.")
    records: int = Field(256, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    concurrency: int = Field(32, ge=1, description="Real-time side: requests in flight.")
    batch_concurrency: int = Field(64, ge=1, description="Batch side: max_concurrent_transforms.")
    threads: int = Field(2, ge=1)
    dtype: Dtype = "auto"
    warmup: bool = Field(True, description="One unmeasured wave per side first (at its concurrency).")


class SideResult(BaseModel):
    seconds: float
    generated_tokens: int
    tokens_per_s: float
    failed: int


class BatchBenchReport(BaseModel):
    config: BatchBenchConfig
    batch: SideResult
    realtime: SideResult
    ratio: float = Field(description="Batch tokens/s ÷ real-time tokens/s (goal ≥ 1.1).")


def run_batch_bench(cfg: BatchBenchConfig, progress: Progress = lambda _: None) -> BatchBenchReport:
    conversations = chat_messages(cfg.records)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        realtime = _realtime(cfg, conversations, folder, progress)
        batch = _batch(cfg, conversations, folder, progress)
    return BatchBenchReport(
        config=cfg, batch=batch, realtime=realtime, ratio=batch.tokens_per_s / realtime.tokens_per_s
    )


def _realtime(
    cfg: BatchBenchConfig, conversations: list[list[dict[str, str]]], folder: Path, progress: Progress
) -> SideResult:
    progress("starting the real-time server")
    args = ["--model", cfg.model, "--dtype", cfg.dtype, "--threads", str(cfg.threads), "--log-format", "text"]
    with ServerProcess(args, log_path=folder / "serve.log") as server:
        server.wait_healthy()
        progress(f"real-time: {cfg.records} chat requests at concurrency {cfg.concurrency}")
        bench_cfg = chat_workload(server.url, conversations, folder, max_new_tokens=cfg.max_new_tokens)
        warmup = cfg.concurrency if cfg.warmup else 0
        report = serve_bench(bench_cfg.model_copy(update={"concurrency": cfg.concurrency, "warmup": warmup}))
    return SideResult(
        seconds=report.duration_s,
        generated_tokens=report.total_output_tokens,
        tokens_per_s=report.output_token_throughput,
        failed=report.failed,
    )


def _batch(
    cfg: BatchBenchConfig, conversations: list[list[dict[str, str]]], folder: Path, progress: Progress
) -> SideResult:
    import asyncio

    from twinserve.jobs.transform import build_target

    progress("batch: loading the model")
    job_cfg = _job_config(cfg, "bench-batch", conversations, folder)
    target = build_target(job_cfg)
    try:
        if cfg.warmup:
            progress(f"batch: warm-up wave of {cfg.batch_concurrency} records")
            _run(
                _job_config(cfg, "bench-warmup", conversations[: cfg.batch_concurrency], folder),
                target,
                folder,
            )
        progress(f"batch: {cfg.records} chat records, {cfg.batch_concurrency} in flight")
        state = _run(job_cfg, target, folder)
    finally:
        asyncio.run(target.close())
    seconds = state.transform_seconds
    return SideResult(
        seconds=seconds,
        generated_tokens=state.generated_tokens,
        tokens_per_s=state.generated_tokens / seconds,
        failed=state.records_failed,
    )


def _job_config(
    cfg: BatchBenchConfig, name: str, conversations: list[list[dict[str, str]]], folder: Path
) -> TransformJobConfig:
    source = folder / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return TransformJobConfig(
        name=name,
        model=cfg.model,
        input=str(source),
        output=str(folder / "out"),
        max_concurrent_transforms=cfg.batch_concurrency,
        parameters={"max_new_tokens": cfg.max_new_tokens, "ignore_eos": True},
        dtype=cfg.dtype,
        num_threads=cfg.threads,
    )


def _run(job_cfg: TransformJobConfig, target: Target, folder: Path) -> TransformJob:
    jobs = folder / "jobs"
    JobDir(job_cfg.name, jobs).save(JobRecord(config=job_cfg, state=TransformJob(name=job_cfg.name)))
    state = run_job(job_cfg.name, home=jobs, target=target)  # the clock excludes loading
    if state.failure_reason or state.records_failed:
        raise RuntimeError(f"the batch job failed: {state.failure_reason or state.records_failed}")
    return state
