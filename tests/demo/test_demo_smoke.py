"""The whole pipeline, end to end, as `make test` runs it: `distillery demo --profile smoke --json` in a subprocess.

Real broker, real vLLM teacher and serving engines (tiny random Llama), real trainer, real gRPC between separate
processes; the report must say what the run did and that nothing failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REQUIRED = ("teacher_accuracy", "student_accuracy", "accuracy_ratio", "teacher_params", "student_params",
            "size_ratio", "speed_ratio", "student_streams_at_target", "swaps", "failed_requests", "wall_s")  # fmt: skip


def test_smoke_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "DISTILLERY_KAFKA_BOOTSTRAP"}  # the demo starts its own broker
    env.update(DISTILLERY_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "distillery"),
            "demo",
            "--profile",
            "smoke",
            "--json",
            "--run-dir",
            str(run_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    missing = [key for key in REQUIRED if key not in summary]
    assert not missing, missing

    assert summary["profile"] == "smoke"
    assert summary["failed_requests"] == 0
    assert summary["streams"] > 0 and summary["streams_below_target"] == 0
    # The smoke gate promotes every checkpoint: serving must have hot-swapped at least one student in.
    assert summary["swaps"] >= 1 and summary["served_versions"]
    assert 0 < summary["student_params"] < summary["teacher_params"] and summary["size_ratio"] > 1
    assert summary["teacher_samples"] >= summary["train_prompts"] > 0
    assert summary["student_tokens_per_s"] > 0 and summary["teacher_tokens_per_s"] > 0
    assert summary["student_streams_at_target"] >= 1

    full = json.loads((run_dir / "report.json").read_text())
    assert full["history"] and full["evals"], "WatchRun progress and evaluations reach the report"
    assert [c for c in full["checkpoints"] if c["promoted"]]
    for name in ("report.md", "training.png", "wpm.png", "teacher_vs_student.png", "speed.json"):
        assert (run_dir / name).stat().st_size > 0, name
    # Everything the demo started has stopped: the embedded broker's state file is removed only after its PID is gone.
    assert not (run_dir / "broker" / "broker.json").exists()
    assert (run_dir / "broker").is_dir(), "the demo ran its own broker in the run folder"
