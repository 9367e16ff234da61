"""kill -9 of a serving or trainer service process leaves nothing behind (serving's engine cores used to run on,
re-parented to init: three of them, 4.9 GB, for the default standby swap strategy)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from services.common.process import ServiceProcess
from services.common.settings import KafkaSettings
from tests.leftovers import family, kill_all, wait_gone


def _env(name: str, model: Path, home: Path, kafka: KafkaSettings) -> dict[str, str]:
    prefix = f"DISTILLERY_{name.upper()}_"
    per_service = {
        "serving": {"INITIAL_MODEL": str(model), "VLLM__ENFORCE_EAGER": "true", "VLLM__KV_CACHE_GIB": "0.25",
                    "VLLM__MAX_MODEL_LEN": "256"},  # the default swap strategy: standby engines too
        "trainer": {"TEACHER_MODEL": str(model)},
    }[name]  # fmt: skip
    return {
        **os.environ,
        "DISTILLERY_HOME": str(home),
        "DISTILLERY_KAFKA_BOOTSTRAP": str(kafka.bootstrap),
        "DISTILLERY_KAFKA_PARTITIONS": str(kafka.partitions),
        "OMP_NUM_THREADS": "2",
        f"{prefix}REGISTRY_DIR": str(home / "registry"),
        **{prefix + key: value for key, value in per_service.items()},
    }


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name", ["serving", "trainer"])
def test_kill_9_of_a_service_leaves_no_process_behind(
    name: str, tiny_model_dir: Path, tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    service = ServiceProcess(name, _env(name, tiny_model_dir, tmp_path / "home", kafka_settings), tmp_path / "log")
    service.start()
    assert service.proc is not None
    procs = []
    try:
        service.wait_healthy(300)
        procs = family(service.proc.pid)
        if name == "serving":
            cores = [p for p in procs if "EngineCore" in " ".join(p.cmdline()) + p.name()]
            assert cores, [p.name() for p in procs]
        os.kill(service.proc.pid, signal.SIGKILL)  # the service alone, not its process group
        service.proc.wait(30)
        left = wait_gone(procs, timeout_s=30)
        print(f"{name}: {len(procs)} processes before kill -9, {len(left)} left")
        assert left == [], f"{len(left)} process(es) left after kill -9 of {name}: {left}"
    finally:
        kill_all(procs)
        service.stop(grace_s=5)
