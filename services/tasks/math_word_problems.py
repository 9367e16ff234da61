"""The seed task: grade-school math word problems with reference answers and an answer checker.

"How many cookies did you sell if you sold 320 chocolate cookies and 270 vanilla cookies?" A seeded generator
fills many templates (people, objects, verbs; one- and two-step; +, -, ×). Difficulty is the size of the
numbers and the number of steps:

    1: one step, + or -, numbers up to 20       3: two steps (+-, ×+, --), numbers up to 50
    2: one step, +, - or ×, numbers up to 100   4: one or two steps, numbers in the hundreds

A problem's split (train / eval) follows from a hash of its text, so the held-out split never shares a
question with the training split, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from services.tasks.base import Problem

NAMES = [
    ("Sam", "he"), ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Emma", "she"),
    ("Liam", "he"), ("Olivia", "she"), ("Ethan", "he"), ("Zoe", "she"), ("Omar", "he"), ("Priya", "she"),
    ("Carlos", "he"), ("Hana", "she"), ("Jack", "he"), ("Lily", "she"), ("Ben", "he"), ("Chloe", "she"),
    ("Ravi", "he"), ("Sofia", "she"), ("Max", "he"), ("Grace", "she"), ("Tom", "he"), ("Nora", "she"),
]  # fmt: skip
OBJECTS = [
    "apples", "cookies", "marbles", "stickers", "pencils", "books", "cards", "balloons", "shells", "stamps",
    "flowers", "cupcakes", "toy cars", "crayons", "eggs", "oranges", "buttons", "coins", "ribbons", "beads",
]  # fmt: skip
FOODS = ["apples", "cookies", "cupcakes", "oranges", "grapes", "strawberries", "cherries", "muffins"]
KINDS = ["red", "blue", "green", "big", "small", "chocolate", "vanilla", "shiny", "old", "new"]
CONTAINERS = ["box", "basket", "jar", "bag", "bowl", "drawer"]
PLACES = ["shop", "library", "school", "bakery", "farm", "classroom"]
GET_VERBS = ["buys", "finds", "gets", "collects", "is given", "wins"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]

SYSTEM_PROMPT = "Solve the math word problem. Finish with: The answer is <number>."

_ANSWER_RE = re.compile(r"answer\s*(?:is|:|=)?\s*[:=]?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class _Slots:
    name: str
    pron: str
    name2: str
    obj: str
    food: str
    kind1: str
    kind2: str
    container: str
    place: str
    verb: str
    day1: str
    day2: str

    @property
    def Pron(self) -> str:
        return self.pron.capitalize()

    @property
    def has(self) -> str:
        return "has"


def _slots(rng: random.Random) -> _Slots:
    (name, pron), (name2, _) = rng.sample(NAMES, 2)
    kind1, kind2 = rng.sample(KINDS, 2)
    day1, day2 = rng.sample(DAYS, 2)
    return _Slots(name, pron, name2, rng.choice(OBJECTS), rng.choice(FOODS), kind1, kind2,
                  rng.choice(CONTAINERS), rng.choice(PLACES), rng.choice(GET_VERBS), day1, day2)  # fmt: skip


# Each template: (operation, text, numbers → answer). Slots in {braces}; numbers are {a}, {b}, {c}.
Template = tuple[str, str, Callable[[int, int, int], int]]

ADD: list[Template] = [
    ("add", "{name} has {a} {obj}. {Pron} {verb} {b} more. How many {obj} does {name} have now?",
     lambda a, b, c: a + b),
    ("add", "How many {obj} did {name} sell if {pron} sold {a} {kind1} {obj} and {b} {kind2} {obj}?",
     lambda a, b, c: a + b),
    ("add", "There are {a} {obj} in a {container}. {name} puts {b} more {obj} in the {container}. "
            "How many {obj} are in the {container} now?", lambda a, b, c: a + b),
    ("add", "{name} picked {a} {food} on {day1} and {b} {food} on {day2}. How many {food} did {name} pick "
            "altogether?", lambda a, b, c: a + b),
    ("add", "A {place} has {a} {obj}. It gets {b} more {obj}. How many {obj} does the {place} have now?",
     lambda a, b, c: a + b),
    ("add", "{name} has {a} {obj} and {name2} has {b} {obj}. How many {obj} do they have together?",
     lambda a, b, c: a + b),
]  # fmt: skip
SUB: list[Template] = [
    ("sub", "{name} has {a} {obj}. {Pron} gives {b} {obj} to {name2}. How many {obj} does {name} have left?",
     lambda a, b, c: a - b),
    ("sub", "{name} had {a} {food} and ate {b} of them. How many {food} are left?", lambda a, b, c: a - b),
    ("sub", "There were {a} {obj} in the {container}. {name} took out {b}. How many {obj} are in the "
            "{container} now?", lambda a, b, c: a - b),
    ("sub", "{name} needs {a} {obj}. {Pron} already has {b}. How many more {obj} does {name} need?",
     lambda a, b, c: a - b),
    ("sub", "A {place} had {a} {obj} and sold {b} of them. How many {obj} does the {place} have now?",
     lambda a, b, c: a - b),
    ("sub", "{name} has {a} {obj}. {name2} has {b} {obj}. How many more {obj} does {name} have than {name2}?",
     lambda a, b, c: a - b),
]  # fmt: skip
MUL: list[Template] = [
    ("mul", "{name} buys {a} boxes of {obj}. Each box has {b} {obj}. How many {obj} does {name} buy?",
     lambda a, b, c: a * b),
    ("mul", "There are {a} {container}s with {b} {obj} in each. How many {obj} are there in all?",
     lambda a, b, c: a * b),
    ("mul", "{name} collects {b} {obj} every day for {a} days. How many {obj} does {name} collect?",
     lambda a, b, c: a * b),
]  # fmt: skip
TWO_STEP: list[Template] = [
    ("add_sub", "{name} has {a} {obj}. {Pron} {verb} {b} more and then gives {c} to {name2}. "
                "How many {obj} does {name} have now?", lambda a, b, c: a + b - c),
    ("mul_add", "{name} buys {a} bags of {obj} with {b} in each bag, and finds {c} more. "
                "How many {obj} does {name} have?", lambda a, b, c: a * b + c),
    ("sub_sub", "A {place} had {a} {obj}. It sold {b} in the morning and {c} in the afternoon. "
                "How many {obj} are left?", lambda a, b, c: a - b - c),
    ("add_add", "{name} read {a} pages on {day1}, {b} pages on {day2} and {c} pages on Sunday. "
                "How many pages did {name} read in total?", lambda a, b, c: a + b + c),
]  # fmt: skip

_SYMBOL = {"add": "+", "sub": "-", "mul": "×"}


def _solution(op: str, a: int, b: int, c: int, answer: int) -> str:
    if op in _SYMBOL:
        return f"{a} {_SYMBOL[op]} {b} = {answer}. The answer is {answer}."
    first, second = op.split("_")
    mid = {"add": a + b, "sub": a - b, "mul": a * b}[first]
    return (f"{a} {_SYMBOL[first]} {b} = {mid}. {mid} {_SYMBOL[second]} {c} = {answer}. "
            f"The answer is {answer}.")  # fmt: skip


def _numbers(rng: random.Random, op: str, difficulty: int) -> tuple[int, int, int]:
    top = {1: 20, 2: 100, 3: 50, 4: 900}[difficulty]
    low = 100 if difficulty == 4 else 1
    if op == "mul":
        return rng.randint(2, 12 if difficulty < 4 else 30), rng.randint(2, 12 if difficulty < 4 else 30), 0
    if op == "mul_add":
        return rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, top // 2)
    a, b, c = rng.randint(low, top), rng.randint(low, top), rng.randint(low, top)
    if op == "sub":
        a, b = max(a, b), min(a, b)
        if a == b:
            a += 1
    if op == "sub_sub":
        a = b + c + rng.randint(1, top)
    if op == "add_sub":
        c = rng.randint(1, a + b)
    return a, b, c


def split_of(question: str, eval_fraction: float = 0.2) -> str:
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 1000
    return "eval" if bucket < eval_fraction * 1000 else "train"


class MathWordProblems:
    """Grade-school math word problems; answers are integers."""

    name = "math_word_problems"
    system_prompt = SYSTEM_PROMPT

    def templates(self, difficulty: int) -> list[Template]:
        if difficulty not in (1, 2, 3, 4):
            raise ValueError(f"difficulty={difficulty!r}: must be 1, 2, 3 or 4")
        return {1: ADD + SUB, 2: ADD + SUB + MUL, 3: TWO_STEP, 4: ADD + SUB + TWO_STEP[:1] + TWO_STEP[2:]}[difficulty]

    def generate(self, n: int, seed: int, split: str, difficulty: int = 1) -> list[Problem]:
        """`n` distinct problems of the given split, reproducible from `seed`."""
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r}: must be 'train' or 'eval'")
        rng = random.Random(f"{self.name}/{seed}/{difficulty}")
        templates = self.templates(difficulty)
        out: list[Problem] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 1000:
                raise ValueError(f"n={n}: not enough distinct {split} problems at difficulty {difficulty}")
            op, text, fn = rng.choice(templates)
            a, b, c = _numbers(rng, op, difficulty)
            slots = _slots(rng)
            question = text.format(a=a, b=b, c=c, **{k: getattr(slots, k) for k in _SLOT_NAMES})
            if question in seen or split_of(question) != split:
                continue
            seen.add(question)
            answer = fn(a, b, c)
            digest = hashlib.sha256(question.encode()).hexdigest()[:12]
            out.append(
                Problem(
                    prompt_id=f"mwp-d{difficulty}-{digest}",
                    question=question,
                    answer=str(answer),
                    solution=_solution(op, a, b, c, answer),
                    split=split,
                    difficulty=difficulty,
                    metadata={"op": op},
                )
            )
        return out

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": problem.question}]

    def extract(self, completion: str) -> str | None:
        """The final answer: the number after the last "answer is", else the last number in the text."""
        found = _ANSWER_RE.findall(completion)
        candidates = found or _NUMBER_RE.findall(completion)
        if not candidates:
            return None
        value = candidates[-1].replace(",", "")
        try:
            number = float(value)
        except ValueError:
            return None
        return str(int(number)) if number == int(number) else str(number)

    def check(self, completion: str, reference: str) -> bool:
        got = self.extract(completion)
        return got is not None and got == self.extract(reference)


_SLOT_NAMES = [
    "name", "pron", "Pron", "name2", "obj", "food", "kind1", "kind2", "container", "place", "verb", "day1", "day2",
]  # fmt: skip
