"""Counting the processes a command leaves behind: its family before a signal, then poll until that family is gone."""

from __future__ import annotations

import contextlib
import time

import psutil


def family(pid: int) -> list[psutil.Process]:
    """The process and every descendant it has now."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has exited; psutil's identity check guards against PID reuse)."""
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[str]:
    """Polls until every process in `procs` has exited; returns a description of those left after the timeout."""
    deadline = time.monotonic() + timeout_s
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in left if p.is_running()]


def kill_all(procs: list[psutil.Process]) -> None:
    """Test clean-up: SIGKILL whatever of `procs` still runs."""
    for proc in alive(procs):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
