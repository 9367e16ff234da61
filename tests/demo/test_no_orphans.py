"""`distillery demo` stopped by SIGTERM (what `timeout` sends) or killed with SIGKILL leaves no process behind: not
its broker, not the teacher, trainer or serving processes, not their vLLM engine cores. SIGINT (Ctrl-C) takes the
SIGTERM path (both are a KeyboardInterrupt in the pipeline)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.leftovers import family, kill_all, wait_gone

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SERVICES = ("teacher serve", "trainer serve", "serving serve")


def _services_up(log: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Polls the demo's console log until its services phase is done (all three SERVING)."""
    deadline = time.monotonic() + timeout_s
    while "starting teacher, trainer and serving (vLLM engines take a while) — done" not in log.read_text(
        errors="replace"
    ):
        assert proc.poll() is None, f"the demo exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"services not up after {timeout_s}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_signalled_demo_leaves_no_process_behind(tmp_path: Path, sig: signal.Signals) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISTILLERY_KAFKA_BOOTSTRAP"}  # it starts its own broker
    env.update(DISTILLERY_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", COLUMNS="200")
    log = tmp_path / "demo.log"
    command = [str(Path(sys.executable).parent / "distillery"), "demo", "--profile", "smoke", "--run-dir",
               str(tmp_path / "run")]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    procs = []
    try:
        _services_up(log, proc, timeout_s=400)
        procs = family(proc.pid)
        lines = [" ".join(p.cmdline()) for p in procs]
        assert all(any(name in line for line in lines) for name in SERVICES), lines
        assert any("EngineCore" in line or "EngineCore" in p.name() for p, line in zip(procs, lines, strict=True))
        assert (tmp_path / "run" / "broker" / "broker.json").exists()
        proc.send_signal(sig)
        proc.wait(240)
        left = wait_gone(procs, timeout_s=60)
        assert left == [], f"{len(left)} of {len(procs)} processes left after {sig.name} of the demo: {left}"
        if sig == signal.SIGTERM:
            assert proc.returncode == 130, log.read_text()[-3000:]
            assert not (tmp_path / "run" / "broker" / "broker.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        kill_all(procs)
