"""`distillery bench rescore`: a run's checkpoints scored again on a larger held-out draw."""

from __future__ import annotations

import json
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
    from services.common.models import load_tokenizer

    examples, _ = rescore.held_out("math_word_problems", 10, seed=3)
    tokenizer = load_tokenizer(tiny_model)
    expected = [
        list(tokenizer.apply_chat_template(e.content.chat(), add_generation_prompt=True, tokenize=True)["input_ids"])
        for e in examples
    ]

    # The first half answered right in other words than the reference (the numeric checker reads the answer), the
    # rest wrong.
    def half_right(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        assert prompts == expected and max_new_tokens == 32
        return [
            f"So it comes to {e.metadata['answer']}. The answer is {e.metadata['answer']}." if i < 5 else "It is -1."
            for i, e in enumerate(examples)
        ]

    monkeypatch.setattr(rescore, "answers", half_right)
    run = _run(tmp_path / "run", tiny_model, (100, 200))
    result = rescore.rescore([run], "math_word_problems", 10, seed=3, max_new_tokens=32, log=lambda _: None)
    (scored,) = result["runs"]
    assert [(c["step"], c["accuracy"]) for c in scored["checkpoints"]] == [(100, 0.5), (200, 0.5)]
    assert (scored["best"], scored["last"]["step"], scored["mean"], scored["refused"]) == (0.5, 200, 0.5, [])


def test_the_runs_own_held_out_prompts_are_left_out_of_the_draw(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_draw, _ = rescore.held_out("math_word_problems", 10, seed=3)
    run = _run(tmp_path / "run", tiny_model, (100,))
    # What the demo writes beside the registry: its prompts file, with the held-out lines the gate judged on.
    lines = [{"id": first_draw[0].id, "split": "eval"}, {"id": first_draw[1].id, "split": "train"}, "not json"]
    (run / "math_word_problems.jsonl").write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines))
    seen: list[int] = []
    monkeypatch.setattr(rescore, "answers", lambda m, t, prompts, n: seen.append(len(prompts)) or [""] * len(prompts))
    result = rescore.rescore([run], "math_word_problems", 10, seed=3, max_new_tokens=32, log=lambda _: None)
    assert result["left_out_runs_held_out"] == 1 and result["problems"] == 10 and seen == [10]
    drawn, _ = rescore.held_out("math_word_problems", 10, seed=3, exclude={first_draw[0].id})
    assert first_draw[0].id not in {e.id for e in drawn} and first_draw[1].id in {e.id for e in drawn}


def test_the_draw_is_the_use_cases_held_out_split(tmp_path: Path) -> None:
    examples, checker = rescore.held_out("math_word_problems", 25, seed=1)
    assert len(examples) == 25 and {e.split for e in examples} == {"eval"}
    assert checker("so 3. The answer is 12.", "9 + 3 = 12. The answer is 12.")
    with pytest.raises(rescore.RescoreError, match="not a built-in use case"):
        rescore.held_out("no_such_task", 5, seed=1)


def test_a_tampered_or_unreadable_checkpoint_is_refused_by_name_and_the_others_are_scored(
    tiny_model: Path, tmp_path: Path
) -> None:
    run = _run(tmp_path / "run", tiny_model, (100, 200, 300))
    first, second, _ = sorted((run / "registry" / "checkpoints").iterdir())
    weights = first / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    (second / "manifest.json").write_text("{not json")
    lines: list[str] = []
    result = rescore.rescore([run], "math_word_problems", 3, seed=1, max_new_tokens=4, log=lines.append)
    (scored,) = result["runs"]
    refused = {r["checkpoint"]: r["why"] for r in scored["refused"]}
    assert "model.safetensors" in refused[first.name] and "unreadable manifest" in refused[second.name]
    # The untouched checkpoint ran through the real model and generation.
    assert [c["version"] for c in scored["checkpoints"]] == [3] and 0.0 <= scored["best"] <= 1.0
    assert any(f"{first.name}: refused" in line for line in lines)


def test_a_folder_without_a_registry_is_refused_with_exit_code_2_before_any_run_is_scored(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.cli import app

    out = CliRunner().invoke(app, ["bench", "rescore", str(tmp_path), "--problems", "0"])
    assert out.exit_code == 2 and "--problems" in out.output
    run = _run(tmp_path / "run", tiny_model, (100,))

    def never(*args: Any) -> list[str]:
        raise AssertionError("a run was scored before every folder was checked")

    monkeypatch.setattr(rescore, "answers", never)
    out = CliRunner().invoke(app, ["bench", "rescore", str(run), str(tmp_path / "typo"), "--problems", "3"])
    assert out.exit_code == 2 and "typo" in out.output and "neither a run folder" in out.output
    (tmp_path / "empty" / "registry" / "checkpoints").mkdir(parents=True)
    out = CliRunner().invoke(app, ["bench", "rescore", str(tmp_path / "empty")])
    assert out.exit_code == 2 and "holds no checkpoints" in out.output
