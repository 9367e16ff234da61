"""The built-in use cases: seeded generators that export prompts as JSONL, each with the checker that judges them.

Nothing outside this package knows a use case by name: the pipeline, the trainer and the benchmarks read JSONL
prompts and a checker spec. `distillery tasks list` / `distillery tasks export NAME` are the way in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.tasks import math_word_problems, review_sentiment
from services.tasks.dataset import Example


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    description: str
    #: The checker spec to distil it with (`--checker`).
    checker: str
    #: (n_train, n_eval, seed) → examples with their splits and references.
    generate: Callable[[int, int, int], list[Example]]
    #: How the held-out split is made independent of the training one.
    held_out: str


TASKS: dict[str, BuiltinTask] = {
    t.name: t
    for t in (
        BuiltinTask(
            name=math_word_problems.NAME,
            description="grade-school word problems (one-step + and −, numbers up to 20), worked solutions",
            checker=math_word_problems.CHECKER,
            generate=lambda n_train, n_eval, seed: math_word_problems.generate(n_train, n_eval, seed, difficulty=1),
            held_out=f"fact-disjoint: {math_word_problems.EVAL_FACT_FRACTION:.0%} of arithmetic facts held out",
        ),
        BuiltinTask(
            name=review_sentiment.NAME,
            description="product reviews labelled positive or negative",
            checker=review_sentiment.CHECKER,
            generate=review_sentiment.generate,
            held_out=f"phrase-disjoint: {review_sentiment.EVAL_PHRASE_FRACTION:.0%} of opinion phrases held out",
        ),
    )
}
#: The use case the benchmarks and the demo draw their prompts from.
DEFAULT_TASK = math_word_problems.NAME


def get_builtin(name: str) -> BuiltinTask:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a built-in use case: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def default_prompts(n: int, seed: int = 0) -> list[Example]:
    """`n` prompts of the default use case (training split): what benchmarks load when given no prompts file."""
    return get_builtin(DEFAULT_TASK).generate(n, 0, seed)
