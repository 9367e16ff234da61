"""`distillery bench rescore`: a run's checkpoints scored again on a larger held-out draw."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from services.bench import rescore
from services.common.registry import Registry


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.common.tiny import build_llama

    return build_llama(tmp_path_factory.mktemp("tiny") / "m", dtype="float32")


def _run(root: Path, model: Path, steps: tuple[int, ...]) -> Path:
    """A run folder as the demo writes it: `<run>/registry` with one checkpoint per step."""
    registry = Registry(root / "registry")
    for step in steps:
        staged = registry.staging_dir()
        for file in model.iterdir():
            shutil.copy(file, staged / file.name)
        registry.write(staged, run_id="r", step=step, parameter_count=1)
    return root


def test_each_checkpoint_is_scored_with_the_tasks_checker_on_one_draw(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model answers the first half of the problems right (their references) and the rest wrong.
    def half_right(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        examples, _ = rescore.held_out("math_word_problems", 10, seed=3)
        assert len(prompts) == len(examples) == 10 and max_new_tokens == 32
        return [e.reference if i < 5 else "The answer is -1." for i, e in enumerate(examples)]

    monkeypatch.setattr(rescore, "answers", half_right)
    run = _run(tmp_path / "run", tiny_model, (100, 200))
    result = rescore.rescore([run], "math_word_problems", 10, seed=3, max_new_tokens=32, log=lambda _: None)
    (scored,) = result["runs"]
    assert [(c["step"], c["accuracy"]) for c in scored["checkpoints"]] == [(100, 0.5), (200, 0.5)]
    assert (scored["best"], scored["last"], scored["mean"], scored["refused"]) == (0.5, 0.5, 0.5, [])


def test_the_draw_is_the_use_cases_held_out_split(tmp_path: Path) -> None:
    examples, checker = rescore.held_out("math_word_problems", 25, seed=1)
    assert len(examples) == 25 and {e.split for e in examples} == {"eval"}
    assert checker("so 3. The answer is 12.", "9 + 3 = 12. The answer is 12.")
    with pytest.raises(rescore.RescoreError, match="not a built-in use case"):
        rescore.held_out("no_such_task", 5, seed=1)


def test_a_tampered_checkpoint_is_refused_by_name_and_the_others_are_scored(tiny_model: Path, tmp_path: Path) -> None:
    run = _run(tmp_path / "run", tiny_model, (100, 200))
    first = sorted((run / "registry" / "checkpoints").iterdir())[0]
    weights = first / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    lines: list[str] = []
    result = rescore.rescore([run], "math_word_problems", 3, seed=1, max_new_tokens=4, log=lines.append)
    (scored,) = result["runs"]
    assert [r["version"] for r in scored["refused"]] == [1] and "model.safetensors" in scored["refused"][0]["why"]
    # The untouched checkpoint ran through the real model and generation.
    assert [c["version"] for c in scored["checkpoints"]] == [2] and 0.0 <= scored["best"] <= 1.0
    assert any("v1: refused" in line for line in lines)


def test_a_folder_without_a_registry_is_refused_with_exit_code_2(tmp_path: Path) -> None:
    from services.cli import app

    out = CliRunner().invoke(app, ["bench", "rescore", str(tmp_path), "--problems", "3"])
    assert out.exit_code == 2 and "neither a run folder" in out.output
    out = CliRunner().invoke(app, ["bench", "rescore", str(tmp_path), "--problems", "0"])
    assert out.exit_code == 2 and "--problems" in out.output
