"""Recognising our own processes by pid, which the OS reuses once a process is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil


def live_cmdline(pid: int | None) -> list[str] | None:
    """The command line of a live (non-zombie) process, or None when it is gone or unreadable."""
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def has_option(cmdline: list[str], flag: str, value: str) -> bool:
    """`flag value` appears as consecutive arguments."""
    return any(a == flag and b == value for a, b in zip(cmdline, cmdline[1:], strict=False))


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by `pid` (our children run in their own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def terminate(pid: int, timeout: float) -> None:
    """SIGTERM (our servers drain and exit 0), then SIGKILL the group, so nothing it spawned stays."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_group(pid)
    deadline = time.monotonic() + 5.0
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
