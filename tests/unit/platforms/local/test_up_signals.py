"""`twinserve up` cleans up however it is stopped: Ctrl-C or a closed terminal (SIGHUP), even
when what it printed to is gone (`make up 2>&1 | tee log`, and tee died with the terminal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.servers import process_gone, until
from twinserve.deploy.state import StateStore


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT], ids=["terminal-closed", "ctrl-c"])
def test_up_deletes_its_endpoint_even_when_its_output_is_gone(
    sig: signal.Signals, tmp_path: Path, tiny_model_dir: Path
) -> None:
    env = {**os.environ, "TWINSERVE_HOME": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "twinserve.cli.main",
        "up",
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "4",
    ]
    # the RAG service once (a closed terminal): Ctrl-C takes the same cleanup path
    cmd += ["--docs", str(_small_docs(tmp_path))] if sig == signal.SIGHUP else ["--no-rag"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    # stderr is not drained meanwhile: what up prints there before it serves fits in the pipe
    try:
        for line in proc.stdout:  # up to the usage text: the endpoint serves
            if b"serving until Ctrl-C" in line:
                break
        else:
            proc.wait(timeout=60)
            raise AssertionError(proc.stderr.read().decode(errors="replace"))
        store = StateStore(tmp_path / "endpoints" / "state.db")
        ep = store.get_endpoint("twin")
        pids = [p for p in (ep.router_pid, ep.controller_pid, ep.async_pid) if p]
        pids += [r.pid for r in store.replicas("twin") if r.pid]
        assert len(pids) >= 4  # router, controller, job service, a replica
        rag = [c.pid for c in psutil.Process(proc.pid).children() if "rag" in c.cmdline()]
        assert len(rag) == (1 if sig == signal.SIGHUP else 0)  # the RAG service in front of the endpoint
        pids += rag
        proc.stdout.close()  # the reader of both streams goes away (tee died with the terminal)
        proc.stderr.close()
        os.killpg(proc.pid, sig)  # what the terminal sends its foreground process group
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert store.list_endpoints() == []
    assert until(lambda: all(process_gone(pid) for pid in pids), 30), pids


def _small_docs(tmp_path: Path) -> Path:
    """A two-page docs/ for the RAG service (the project's own takes longer to embed)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "twin.md").write_text("# LLM twin\n\nAn LLM twin writes in its owner's voice.\n")
    (docs / "serve.md").write_text("# Serving\n\nRun `twinserve serve --model default` to serve it.\n")
    return docs
