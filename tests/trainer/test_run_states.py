"""Run files at start-up and StopRun in every state: a run that died while starting is FAILED, not resumed into
the same death; StopRun stops a run whatever state it is in (no worker, queue or Kafka needed for these)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.common import pb
from services.common.registry import Registry
from services.common.settings import KafkaSettings
from services.trainer.runs import RunManager
from services.trainer.spec import to_json
from tests.trainer.conftest import tiny_spec, trainer_settings


def _manager(teacher: Path, home: Path, **kw: Any) -> RunManager:
    settings = trainer_settings(teacher, home, KafkaSettings(bootstrap="127.0.0.1:1"), **kw)
    # No run is started in these tests, so nothing is ever produced.
    return RunManager(settings, teacher, Registry(settings.registry), producer=None)  # type: ignore[arg-type]


def _run_file(manager: RunManager, run_id: str, state: str, **extra: Any) -> None:
    data = {"spec": to_json(tiny_spec(run_id)), "state": state, "created_at": "2026-01-01T00:00:00Z", "error": ""}
    data.update(extra)
    (manager.settings.runs_dir / f"{run_id}.json").write_text(json.dumps(data))


def test_a_run_that_died_while_starting_is_failed_not_resumed(tiny_teacher: Path, tmp_path: Path) -> None:
    manager = _manager(tiny_teacher, tmp_path)
    _run_file(manager, "crashed", "RUN_STATE_RUNNING", phase="starting")
    assert manager.load_persisted() == []
    run = manager.get("crashed")
    assert run.progress.state == pb.trainer.RUN_STATE_FAILED and "while this run was starting" in run.progress.error
    assert manager.active is None and manager.queue == []
    on_disk = json.loads((manager.settings.runs_dir / "crashed.json").read_text())
    assert on_disk["state"] == "RUN_STATE_FAILED"
    again = _manager(tiny_teacher, tmp_path)  # and at every later start
    assert again.load_persisted() == [] and again.get("crashed").progress.state == pb.trainer.RUN_STATE_FAILED


@pytest.mark.parametrize("state", ["RUN_STATE_RUNNING", "RUN_STATE_QUEUED", "RUN_STATE_UNSPECIFIED"])
def test_stop_run_stops_a_run_in_any_state(tiny_teacher: Path, tmp_path: Path, state: str) -> None:
    manager = _manager(tiny_teacher, tmp_path, resume=False)
    _run_file(manager, "r", state)
    manager.load_persisted()
    assert manager.stop("r").progress.state == pb.trainer.RUN_STATE_STOPPED
    assert json.loads((manager.settings.runs_dir / "r.json").read_text())["state"] == "RUN_STATE_STOPPED"


def test_stop_run_leaves_a_finished_run_as_it_is(tiny_teacher: Path, tmp_path: Path) -> None:
    manager = _manager(tiny_teacher, tmp_path)
    _run_file(manager, "done", "RUN_STATE_SUCCEEDED")
    manager.load_persisted()
    assert manager.stop("done").progress.state == pb.trainer.RUN_STATE_SUCCEEDED
