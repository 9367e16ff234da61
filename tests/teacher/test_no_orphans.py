"""kill -9 of a teacher service leaves no vLLM engine-core process behind (they used to run on, re-parented to init)."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from services.common.process import ServiceProcess
from services.common.settings import KafkaSettings
from tests.leftovers import family, kill_all, wait_gone
from tests.teacher.test_worker_process import _env


@pytest.mark.e2e
@pytest.mark.slow
def test_kill_9_of_the_teacher_takes_its_engine_core_along(
    tiny_model_dir: Path, tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    env = _env(tiny_model_dir, tmp_path, kafka_settings, f"teacher-{uuid.uuid4().hex[:6]}")
    for key in ("DISTILLERY_TEACHER_GRPC_PORT", "DISTILLERY_TEACHER_METRICS_PORT"):
        env.pop(key)  # ServiceProcess picks them
    service = ServiceProcess("teacher", env, tmp_path / "teacher.log")
    service.start()
    assert service.proc is not None
    procs = []
    try:
        service.wait_healthy(240)
        procs = family(service.proc.pid)
        cores = [p for p in procs if "EngineCore" in " ".join(p.cmdline()) + p.name()]
        assert cores, [p.name() for p in procs]
        os.kill(service.proc.pid, signal.SIGKILL)  # the service alone, not its process group
        service.proc.wait(30)
        left = wait_gone(procs, timeout_s=30)
        assert left == [], f"{len(left)} process(es) left after kill -9 of the teacher: {left}"
    finally:
        kill_all(procs)
        service.stop(grace_s=5)
