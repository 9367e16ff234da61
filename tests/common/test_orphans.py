"""Children die with the process that started them, also when it is killed with SIGKILL (no orphans)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.leftovers import family, kill_all, wait_gone


def _parent(code: str, tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """A Python parent running `code`, which prints the PID of the child it started."""
    env = {**os.environ, "DISTILLERY_HOME": str(tmp_path)}
    env.pop("DISTILLERY_KAFKA_BOOTSTRAP", None)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line.strip().isdigit(), f"the parent printed {line!r}"
    return parent, int(line)


def _kill_parent_and_count(parent: subprocess.Popen[str], child: int) -> list[str]:
    procs = family(parent.pid)
    assert child in [p.pid for p in procs]
    parent.kill()
    parent.wait(10)
    try:
        return wait_gone(procs, timeout_s=10)
    finally:
        kill_all(procs)


def test_die_with_parent_kills_the_child_on_sigkill_of_its_parent(tmp_path: Path) -> None:
    code = (
        "import subprocess, time\n"
        "from services.common.process import die_with_parent\n"
        "c = subprocess.Popen(['sleep', '120'], preexec_fn=die_with_parent())\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent, child = _parent(code, tmp_path)
    assert _kill_parent_and_count(parent, child) == []


def test_parent_watchdog_ends_a_child_whose_parent_was_killed(tmp_path: Path) -> None:
    """What vLLM's engine-core processes run (they are forked from threads, so no PR_SET_PDEATHSIG)."""
    child_code = (
        "from services.common.process import exit_when_parent_dies; import os, time; "
        "exit_when_parent_dies(int(os.environ['PARENT']), poll_s=0.1); time.sleep(120)"
    )
    code = (
        "import os, subprocess, sys, time\n"
        "os.environ['PARENT'] = str(os.getpid())\n"
        f"c = subprocess.Popen([sys.executable, '-c', {child_code!r}])\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent, child = _parent(code, tmp_path)
    assert _kill_parent_and_count(parent, child) == []


@pytest.mark.parametrize("engine", ["tansu-s3", "tansu"])
def test_an_embedded_broker_dies_with_its_caller(tmp_path: Path, engine: str) -> None:
    code = (
        "import time\n"
        "from services.common import broker\n"
        f"state = broker.start(die_with_caller=True, engine={engine!r})\n"
        "print(state.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent, broker_pid = _parent(code, tmp_path)
    assert psutil.Process(broker_pid).is_running()
    # tansu-s3: its S3 server (weed) is in the family counted too.
    names = sorted(p.name() for p in family(parent.pid)[1:])
    assert names == (["tansu", "weed"] if engine == "tansu-s3" else ["tansu"])
    assert _kill_parent_and_count(parent, broker_pid) == []
    # ...while `distillery broker start` leaves its broker running on purpose (tests/common/test_broker_cli.py).


def test_sigterm_becomes_a_keyboard_interrupt() -> None:
    from services.common.process import install_sigterm_as_interrupt

    previous = signal.getsignal(signal.SIGTERM)
    install_sigterm_as_interrupt()
    try:
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next statement
            raised = False
        except KeyboardInterrupt:
            raised = True
        assert raised
    finally:
        signal.signal(signal.SIGTERM, previous)
