"""`distillery bench teacher` stopped by SIGTERM (what `timeout` sends) or SIGINT, or killed with SIGKILL, leaves
neither its embedded broker nor its vLLM engine core behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.leftovers import family, kill_all, wait_gone

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _engine_and_broker(pid: int) -> list[psutil.Process] | None:
    procs = family(pid)
    lines = [" ".join(p.cmdline()) + p.name() for p in procs]
    has_core = any("EngineCore" in line for line in lines)
    has_broker = any("tansu" in line or "noida" in line for line in lines)
    return procs if has_core and has_broker else None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["sigterm", "sigint", "sigkill"])
def test_a_signalled_teacher_bench_leaves_no_process_behind(
    tiny_model_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISTILLERY_KAFKA_BOOTSTRAP"}  # it starts its own broker
    env.update(DISTILLERY_HOME=str(tmp_path), OMP_NUM_THREADS="2", DISTILLERY_TEACHER_VLLM__MAX_MODEL_LEN="256")
    log = tmp_path / "bench.log"
    command = [sys.executable, "-m", "services.cli", "bench", "teacher", "--model", str(tiny_model_dir),
               "--prompts", "4", "--max-tokens", "8", "--skip-hf", "--enforce-eager", "--json"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    procs: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while (found := _engine_and_broker(proc.pid)) is None:
            assert proc.poll() is None, f"the bench exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        procs = found
        proc.send_signal(sig)
        proc.wait(120)
        left = wait_gone(procs, timeout_s=30)
        assert left == [], f"{len(left)} of {len(procs)} processes left after {sig.name} of the bench: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        kill_all(procs)
