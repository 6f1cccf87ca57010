"""An endpoint's long-lived helper processes: its router and its controller.

Both must outlive the CLI that started them, so they run detached (their own session, output
to a log file in the endpoint's folder) and are found again by the pid in the state store.
Before a recorded pid is trusted it must still run our module for this endpoint: pids are
reused, and a stale record must never make us signal someone else's process.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from twinserve.platforms.local.processes import has_option, kill_group, live_cmdline, terminate


def configure_logging() -> None:
    """One log format for the helper processes' log files; httpx's line per health probe (every
    second, per replica) would bury the lines that matter."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass
class Daemon:
    """One kind of helper process: `python -m <module> --endpoint NAME …`, logging to `log_name`."""

    module: str
    log_name: str
    # children started by this process, per endpoint: waited on, so none lingers here as a zombie
    _children: dict[str, list[subprocess.Popen[bytes]]] = field(default_factory=dict)

    def start(self, endpoint: str, args: list[str], log_dir: Path) -> subprocess.Popen[bytes]:
        log_dir.mkdir(parents=True, exist_ok=True)
        # reap predecessors that died
        kept = [p for p in self._children.get(endpoint, []) if p.poll() is None]
        cmd = [sys.executable, "-m", self.module, "--endpoint", endpoint, *args]
        with (log_dir / self.log_name).open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._children[endpoint] = [*kept, proc]
        return proc

    def start_recorded(
        self,
        endpoint: str,
        args: list[str],
        log_dir: Path,
        record: Callable[[subprocess.Popen[bytes]], object],
    ) -> subprocess.Popen[bytes]:
        """Start it and `record` its pid in the endpoint; if the record is refused (the endpoint
        is being deleted, or gone) the process is killed at once: nobody would ever stop it."""
        proc = self.start(endpoint, args, log_dir)
        try:
            record(proc)
        except BaseException:
            kill_group(proc.pid)
            proc.wait(10)
            self._forget(endpoint, proc)
            raise
        return proc

    def _forget(self, endpoint: str, proc: subprocess.Popen[bytes]) -> None:
        self._children[endpoint] = [p for p in self._children.get(endpoint, []) if p is not proc]

    def is_ours(self, pid: int | None, endpoint: str) -> bool:
        """`pid` is alive and runs this module for `endpoint`."""
        cmdline = live_cmdline(pid)
        return cmdline is not None and self.module in cmdline and has_option(cmdline, "--endpoint", endpoint)

    def exited(self, endpoint: str) -> int | None:
        """Exit code of the last child this process started for `endpoint`; None if running or not ours."""
        children = self._children.get(endpoint)
        return children[-1].poll() if children else None

    def stop(self, endpoint: str, pid: int | None, timeout: float) -> None:
        """SIGTERM (it drains and exits 0), then SIGKILL its group after `timeout`; idempotent."""
        proc = next((p for p in self._children.get(endpoint, []) if p.pid == pid), None)
        if proc is not None:
            self._forget(endpoint, proc)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    kill_group(proc.pid)
                    proc.wait(10)
            return
        if pid is not None and self.is_ours(pid, endpoint):
            terminate(pid, timeout)
