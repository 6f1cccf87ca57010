"""Chaos: kill -9 the CLI, the controller, the router or a replica at a random moment of a
create, update, scale or delete (real processes, tiny model), issue no command afterwards, and
check that every run heals by itself: InService on the same URL with the expected generation and
counts, serving requests, no replica without a record — or fully gone. `twinserve bench chaos`
runs the same harness for longer (`--runs`, `--seed`)."""

from __future__ import annotations

from pathlib import Path

from twinserve.bench.chaos_bench import ChaosConfig, run_chaos

# ~6 s a run on 2 cores; `twinserve bench chaos --runs 100` runs the same harness for longer
RUNS = 20


def test_every_kill_heals_without_a_command(tiny_model_dir: Path) -> None:
    report = run_chaos(ChaosConfig(model=str(tiny_model_dir), runs=RUNS, seed=7, heal_timeout_s=120))
    failed = [r for r in report.runs if r.violations]
    assert not failed, "\n".join(
        f"run {r.index + 1} ({r.operation}, killed {r.killed} after {r.kill_after_s}s): {r.violations}"
        for r in failed
    )
    assert len(report.runs) == RUNS
    # a chaos test that killed nothing would prove nothing: most kills land inside an operation
    assert sum(r.killed is not None for r in report.runs) >= RUNS // 2, report.kills_by_target
    assert {"create", "delete"} <= set(report.operations), report.operations
