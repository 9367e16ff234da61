"""`distillery bench onpolicy --profile smoke` end to end: our pipeline (real broker, vLLM teacher and serving, trainer
as processes) and TRL's DistillationTrainer on the same tiny student and teacher, both judged on our held-out set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WALL_S = 15.0


def test_smoke_bench_gives_both_sides_held_out_figures_and_tokens_per_s(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "DISTILLERY_KAFKA_BOOTSTRAP"}  # it starts its own broker
    env.update(DISTILLERY_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "distillery"), "bench", "onpolicy", "--profile", "smoke", "--wall-s",
         str(WALL_S), "--json", "--run-dir", str(run_dir)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads((run_dir / "bench-onpolicy.json").read_text())
    for name in ("ours", "trl"):
        got = result[name]
        # The smoke use case has a checker and references: every held-out figure is measured on both sides.
        held = got["held_out"]
        assert all(held[m] is not None for m in ("accuracy", "teacher_agreement", "kl", "top1_agreement")), (name, held)
        assert got["steps"] > 0 and got["completion_tokens"] > 0 and got["tokens_per_s"] > 0, (name, got)
        # Stopped by the wall clock: at least the wall time, and not much more than a step beyond it.
        assert WALL_S <= got["train_seconds"] < WALL_S + 30, (name, got["train_seconds"])
    assert result["ratios"]["tokens_per_s"] == pytest.approx(
        result["ours"]["tokens_per_s"] / result["trl"]["tokens_per_s"], rel=1e-2
    )
    assert result["ours"]["tokens_by_source"].get("scored_student", 0) > 0, "ours trained on-policy"
    assert result["ours"]["on_policy_fraction"] == 0.25  # the kd recipe's
    assert result["held_out"]["prompts"] > 0 and result["held_out"]["agreement_samples"] > 0
    assert {"ours", "trl", "same"} <= set(result["peers"])
    # The speed phase is skipped, and everything the pipeline started has stopped.
    assert any("not measured" in note for note in result["notes"])
    assert not (run_dir / "broker" / "broker.json").exists()
