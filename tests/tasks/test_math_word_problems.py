"""The seed task: reproducible, disjoint splits; a checker that reads final answers the way models write them."""

import pytest

from services.tasks import get_task
from services.tasks.math_word_problems import split_of


@pytest.fixture
def task():
    return get_task("math_word_problems")


def test_reproducible_and_disjoint(task) -> None:
    train = task.generate(300, seed=3, split="train")
    assert train == task.generate(300, seed=3, split="train")
    held_out = task.generate(100, seed=4, split="eval")
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert all(split_of(p.question) == "eval" for p in held_out)
    assert len({p.prompt_id for p in train}) == 300


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_solutions_check_against_their_answers(task, difficulty: int) -> None:
    for problem in task.generate(200, seed=1, split="train", difficulty=difficulty):
        assert task.check(problem.solution, problem.answer), problem
        assert int(problem.answer) >= 0, problem


@pytest.mark.parametrize(
    ("completion", "reference", "correct"),
    [
        ("3 + 5 = 8. The answer is 8.", "8", True),
        ("The answer is: 590", "590", True),
        ("They sold 1,200 cookies in total.", "1200", True),
        ("Answer = 12.0", "12", True),
        ("The answer is 7.", "8", False),
        ("I don't know.", "8", False),
        ("", "8", False),
        ("Sam had 3 apples and bought 5, so 8 apples; the answer is 8 apples.", "8", True),
    ],
)
def test_checker(task, completion: str, reference: str, correct: bool) -> None:
    assert task.check(completion, reference) is correct


def test_bad_arguments(task) -> None:
    with pytest.raises(ValueError, match="difficulty=9"):
        task.generate(1, seed=0, split="train", difficulty=9)
    with pytest.raises(ValueError, match="split='test'"):
        task.generate(1, seed=0, split="test")
    with pytest.raises(ValueError, match="task='nope'"):
        get_task("nope")
