"""A user's job is checked before anything starts, and becomes the prompt records its recipe asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common import pb
from services.demo.job import JobError, load_job
from services.demo.plan import NO_SYSTEM, make_plan
from services.demo.profiles import SMOKE, get_recipe

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]


def _file(path: Path, lines: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _lines(n: int, **extra: object) -> list[dict]:
    return [{"id": f"q{i}", "messages": CHAT, "reference": str(i), **extra} for i in range(n)]


def test_splits_counts_and_the_plan_of_each_recipe(tmp_path: Path) -> None:
    lines = _lines(40) + [{"id": f"e{i}", "prompt": f"say {i}", "split": "eval", "reference": "x",
                           "variants": {"polite": f"please say {i}"}} for i in range(3)]  # fmt: skip
    path = _file(tmp_path / "mine.jsonl", lines)
    job = load_job(path, profile=SMOKE, recipe=get_recipe("best"), checker="exact", eval_fraction=0.0)
    assert job.name == "mine" and job.teacher == "tiny"
    assert (len(job.train), len(job.eval)) == (40, 3)
    best = make_plan(job)
    # The held-out prompts in every declared phrasing, greedy; raw prompts have no system prompt to drop.
    assert [(r.prompt_id, r.prompt_variant) for r in best.eval_records] == [
        ("e0", ""), ("e0", "polite"), ("e1", ""), ("e1", "polite"), ("e2", ""), ("e2", "polite")
    ]  # fmt: skip
    assert all(r.sampling.temperature == 0 and r.split == pb.common.SPLIT_EVAL for r in best.eval_records)
    # best: a few answered (best-of-n), the referenced rest scored; spread through each other.
    assert best.generated_prompts == SMOKE.best_generated and best.scored_prompts == 40 - SMOKE.best_generated
    kinds = [r.score_reference for r in best.train_records]
    assert not kinds[0] and any(kinds[:5]) and sum(kinds) == best.scored_prompts
    assert best.unused_train == 40 - best.generated_prompts - best.scored_prompts
    kd = make_plan(load_job(path, profile=SMOKE, recipe=get_recipe("kd"), eval_fraction=0.0))
    assert kd.scored_prompts == 0 and not any(r.score_reference for r in kd.train_records)
    assert all(r.sampling.temperature == 0 and r.sampling.n == 1 for r in kd.train_records)


def test_a_chat_with_a_system_prompt_is_also_tried_without_it(tmp_path: Path) -> None:
    path = _file(tmp_path / "p.jsonl", [*_lines(3, split="eval"), {"id": "t", "prompt": "x"}])
    plan = make_plan(load_job(path, profile=SMOKE, recipe=get_recipe("kd")))
    bare = [r for r in plan.eval_records if r.prompt_variant == NO_SYSTEM]
    assert len(bare) == 3 and all([m.role for m in r.chat.messages] == ["user"] for r in bare)
    assert plan.variants == [NO_SYSTEM]


def test_an_eval_file_is_the_held_out_split(tmp_path: Path) -> None:
    train = _file(tmp_path / "train.jsonl", _lines(5))
    held = _file(tmp_path / "held.jsonl", [{"id": "h1", "prompt": "x", "reference": "1"}])
    job = load_job(train, profile=SMOKE, recipe=get_recipe("kd"), eval_file=held, checker="numeric")
    assert (len(job.train), len(job.eval)) == (5, 1) and "held.jsonl" in job.held_out
    clash = _file(tmp_path / "clash.jsonl", [{"id": "q1", "prompt": "x"}])
    with pytest.raises(JobError, match="ids in both"):
        load_job(train, profile=SMOKE, recipe=get_recipe("kd"), eval_file=clash)


@pytest.mark.parametrize(
    ("lines", "kwargs", "message"),
    [
        (_lines(3, split="train"), {}, "no held-out prompts"),
        (_lines(3, split="eval"), {}, "no training prompts"),
        ([{"id": "a", "prompt": "x", "split": "eval"}, {"id": "b", "prompt": "y"}], {"checker": "exact"},
         "no held-out prompt has a reference"),
        ([*_lines(4), {"id": "e", "prompt": "x", "split": "eval", "reference": "1"}],
         {"checker": "python:no_such_module_here:f"}, "checker='python:no_such_module_here:f': cannot import"),
        ([*_lines(3), {"id": "e", "prompt": "x", "split": "eval"}], {"student": '{"pruned": {"layers": 2}}'},
         "--student: not a StudentRecipe"),
        ([*_lines(3), {"id": "e", "prompt": "x", "split": "eval"}], {"gate_metric": "accuracy"},
         "--gate-metric accuracy needs --checker"),
        ([*_lines(3), {"id": "e", "prompt": "x", "split": "eval"}], {"on_policy_fraction": 1.5}, "must be in"),
        ([*_lines(3), {"id": "e", "prompt": "x", "split": "eval"}], {"teacher": "/no/such/folder"}, "not a folder"),
    ],
)  # fmt: skip
def test_job_errors_say_what_to_fix(tmp_path: Path, lines: list[dict], kwargs: dict, message: str) -> None:
    path = _file(tmp_path / "p.jsonl", lines)
    with pytest.raises(JobError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_job(path, profile=SMOKE, recipe=get_recipe("kd"), eval_fraction=0.0, **kwargs)


def test_a_teacher_folder_must_be_a_safe_model_with_a_chat_template_for_chats(tmp_path: Path) -> None:
    folder = tmp_path / "teacher"
    folder.mkdir()
    path = _file(tmp_path / "p.jsonl", [*_lines(2), {"id": "e", "messages": CHAT, "split": "eval"}])
    with pytest.raises(JobError, match=r"no config\.json"):
        load_job(path, profile=SMOKE, recipe=get_recipe("kd"), teacher=str(folder))
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(JobError, match="only safetensors"):
        load_job(path, profile=SMOKE, recipe=get_recipe("kd"), teacher=str(folder))
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(JobError, match="no chat template"):
        load_job(path, profile=SMOKE, recipe=get_recipe("kd"), teacher=str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert load_job(path, profile=SMOKE, recipe=get_recipe("kd"), teacher=str(folder)).teacher == str(folder)


def test_a_python_checker_is_found_next_to_the_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "judge_here.py").write_text("def ok(answer, reference):\n    return reference in answer\n")
    monkeypatch.chdir(tmp_path)
    path = _file(tmp_path / "p.jsonl", [*_lines(2), {"id": "e", "prompt": "x", "split": "eval", "reference": "1"}])
    job = load_job(path, profile=SMOKE, recipe=get_recipe("kd"), checker="python:judge_here:ok")
    assert job.checker_modules == ["judge_here"] and job.python_path == [str(tmp_path)]


def test_the_student_option_turns_on_a_restricted_output_vocabulary(tmp_path: Path) -> None:
    """`--student '{"output_vocab_coverage": 0.99}'`: the trainer's default student with a restricted head."""
    from services.trainer.recipes import DEFAULT_STUDENT_RECIPE, with_defaults

    path = _file(tmp_path / "p.jsonl", [*_lines(3), {"id": "e", "prompt": "x", "split": "eval"}])
    job = load_job(path, profile=SMOKE, recipe=get_recipe("kd"), student='{"output_vocab_coverage": 0.99}')
    assert job.student is not None and job.student.output_vocab_coverage == pytest.approx(0.99)
    spec = with_defaults(pb.trainer.RunSpec(student=job.student))
    assert spec.student.pruned == DEFAULT_STUDENT_RECIPE.pruned
    assert spec.student.output_vocab_coverage == pytest.approx(0.99)
