"""`distillery bench scale`: argument checks and the summary arithmetic (the measurements have their own tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.bench import scale
from services.cli import app


def test_unknown_part_is_a_usage_error_naming_the_option() -> None:
    result = CliRunner().invoke(app, ["bench", "scale", "--parts", "teacher,gpu"])
    assert result.exit_code == 2
    assert "--parts" in result.output


def test_run_scale_refuses_unknown_parts_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown parts"):
        scale.run_scale(("serving", "nope"), workdir=tmp_path)


def test_trainer_part_summarises_ratios_and_the_loss_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = {
        1: {"samples_per_s": 100.0, "step_s_mean": 0.08, "losses": [5.0, 4.5, 4.0]},
        2: {"samples_per_s": 80.0, "step_s_mean": 0.1, "losses": [5.0, 4.5000002, 3.9999999]},
    }
    import services.bench.scale_trainer as scale_trainer

    monkeypatch.setattr(scale_trainer, "measure_trainer", lambda world, steps: figures[world])
    out = scale.run_scale(("trainer",), workdir=Path("."))["trainer"]
    assert out["samples_per_s_ratio"] == 0.8
    assert out["step_time_ratio"] == 1.25
    assert out["first_losses_max_abs_diff"] == pytest.approx(2e-7, abs=1e-9)


def test_non_finite_figures_become_null() -> None:
    assert scale._finite({"a": [float("inf"), 1.0], "b": float("nan")}) == {"a": [None, 1.0], "b": None}
