"""The built-in use cases: reproducible exports whose held-out split shares no fact (math) or opinion phrase
(reviews) with training, references their own checker accepts, and the CLI that writes them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.tasks import parse_checker, read_examples
from services.tasks.builtin import TASKS, default_prompts, get_builtin
from services.tasks.math_word_problems import fact_key, fact_split, generate


def test_math_held_out_facts_never_appear_in_training() -> None:
    # The demo's real sets (default profile: 6,200 training and 300 held-out problems, seed 1).
    examples = get_builtin("math_word_problems").generate(6200, 300, 1)
    train = [e for e in examples if e.split == "train"]
    held_out = [e for e in examples if e.split == "eval"]
    assert (len(train), len(held_out)) == (6200, 300)
    train_facts = {f for e in train for f in e.metadata["facts"].split()}
    eval_facts = {f for e in held_out for f in e.metadata["facts"].split()}
    assert not train_facts & eval_facts
    assert len(eval_facts) >= 50, "enough distinct held-out facts for a meaningful accuracy"
    # Facts read back from the worked solutions themselves, commutative ones in either order.
    equations = {(line.split()[0], line.split()[1], line.split()[2]) for e in train for line in e.reference.split(". ")
                 if " = " in line}  # fmt: skip
    ops = {"+": "add", "-": "sub", "×": "mul"}
    assert not {fact_key(ops[op], int(x), int(y)) for x, op, y in equations} & eval_facts
    assert not {e.content.messages[-1][1] for e in train} & {e.content.messages[-1][1] for e in held_out}


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_math_two_step_problems_keep_every_fact_on_one_side(difficulty: int) -> None:
    for e in generate(150, 30, seed=2, difficulty=difficulty):
        assert {fact_split(f) for f in e.metadata["facts"].split()} == {e.split}
        assert parse_checker("numeric")(e.reference, e.metadata["answer"])
        assert int(e.metadata["answer"]) >= 0


def test_review_held_out_phrases_never_appear_in_training() -> None:
    examples = get_builtin("review_sentiment").generate(3000, 300, 1)
    train = {p for e in examples if e.split == "train" for p in e.metadata["phrases"].split(" | ")}
    held_out = {p for e in examples if e.split == "eval" for p in e.metadata["phrases"].split(" | ")}
    assert held_out and not train & held_out
    labels = [e.reference for e in examples if e.split == "eval"]
    assert 0.35 < labels.count("positive") / len(labels) < 0.65


@pytest.mark.parametrize("name", sorted(TASKS))
def test_exports_are_reproducible_and_judged_by_their_checker(name: str) -> None:
    task = get_builtin(name)
    first = task.generate(50, 10, 3)
    assert first == task.generate(50, 10, 3) and first != task.generate(50, 10, 4)
    assert len({e.id for e in first}) == 60
    check = parse_checker(task.checker)
    assert all(check(e.reference, e.reference) for e in first)


def test_unknown_task_is_named() -> None:
    with pytest.raises(ValueError, match="task='nope' is not a built-in use case"):
        get_builtin("nope")
    assert len(default_prompts(5)) == 5


def test_tasks_cli_lists_and_exports(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "services.cli", "tasks"]
    listed = subprocess.run([*cli, "list", "--json"], capture_output=True, text=True, check=True).stdout
    assert {json.loads(line)["name"] for line in listed.splitlines()} == set(TASKS)
    out = tmp_path / "reviews.jsonl"
    done = subprocess.run([*cli, "export", "review_sentiment", "--n", "40", "--out", str(out)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == {"path": str(out), "checker": get_builtin("review_sentiment").checker, "train": 36, "eval": 4}
    assert len(read_examples(out)) == 40
    bad = subprocess.run([*cli, "export", "nope", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a built-in use case" in bad.stderr
