"""What a task is: it makes prompts with reference answers and decides whether an answer is correct."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    prompt_id: str
    question: str
    #: The reference answer as the checker compares it (e.g. "590").
    answer: str
    #: A short worked solution ending in the answer: the "factual data" a student can also learn from.
    solution: str
    split: str
    difficulty: int
    metadata: dict[str, str] = field(default_factory=dict)


class Task(Protocol):
    name: str
    system_prompt: str

    def generate(self, n: int, seed: int, split: str, difficulty: int = 1) -> list[Problem]: ...

    def messages(self, problem: Problem) -> list[dict[str, str]]: ...

    def extract(self, completion: str) -> str | None: ...

    def check(self, completion: str, reference: str) -> bool: ...


def get_task(name: str) -> Task:
    from services.tasks.math_word_problems import MathWordProblems

    tasks: dict[str, type] = {MathWordProblems.name: MathWordProblems}
    if name not in tasks:
        raise ValueError(f"task={name!r} is not one of {sorted(tasks)}")
    task: Task = tasks[name]()
    return task


def task_names() -> list[str]:
    from services.tasks.math_word_problems import MathWordProblems

    return [MathWordProblems.name]
