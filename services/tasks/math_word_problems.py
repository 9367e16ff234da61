"""Built-in use case: grade-school math word problems, exported as prompts with worked solutions (`numeric` checker).

"How many cookies did you sell if you sold 320 chocolate cookies and 270 vanilla cookies?" A seeded generator
fills many templates (people, objects, verbs; one- and two-step; +, -, ×). Difficulty is the size of the
numbers and the number of steps:

    1: one step, + or -, numbers up to 20       3: two steps (+-, ×+, --), numbers up to 50
    2: one step, +, - or ×, numbers up to 100   4: one or two steps, numbers in the hundreds

Held-out problems are fact-disjoint from training ones. Every step of a worked solution is a fact ("8 + 4 = 12";
4 + 8 is the same fact as 8 + 4), and a fact's split follows from a hash of the fact alone: `EVAL_FACT_FRACTION` of
all facts are held out. A problem is held out when every fact it uses is, trained on when none is, and never
generated otherwise, so no held-out fact appears in any training prompt, reference or teacher sample: a student
must do arithmetic it never saw, not recall it with new wording around it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from services.tasks.dataset import Content, Example, fill_splits

NAME = "math_word_problems"
CHECKER = "numeric"
SYSTEM_PROMPT = "Solve the math word problem. Finish with: The answer is <number>."
#: The name of the phrasing with SYSTEM_PROMPT (a declared variant of every problem).
INSTRUCTIONS = "instructions"
#: Fraction of arithmetic facts held out (per fact, not per problem).
EVAL_FACT_FRACTION = 0.2

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
_APPLY = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y}


def steps(op: str, a: int, b: int, c: int) -> list[tuple[str, int, int]]:
    """The (operation, left, right) of each step of the worked solution, in order."""
    if op in _SYMBOL:
        return [(op, a, b)]
    first, second = op.split("_")
    return [(first, a, b), (second, _APPLY[first](a, b), c)]


def fact_key(op: str, x: int, y: int) -> str:
    """A fact as text; + and × are commutative, so 4 + 8 and 8 + 4 are one fact ("add:4:8")."""
    if op in ("add", "mul"):
        x, y = min(x, y), max(x, y)
    return f"{op}:{x}:{y}"


def fact_split(key: str, eval_fraction: float = EVAL_FACT_FRACTION) -> str:
    bucket = int(hashlib.sha256(f"{NAME}/fact/{key}".encode()).hexdigest()[:8], 16)
    return "eval" if bucket < eval_fraction * 2**32 else "train"


def problem_split(facts: list[str]) -> str | None:
    """ "eval" when every fact is held out, "train" when none is, None (not generated) when they are mixed."""
    splits = {fact_split(f) for f in facts}
    return splits.pop() if len(splits) == 1 else None


def solution(op: str, a: int, b: int, c: int, answer: int) -> str:
    lines = [f"{x} {_SYMBOL[o]} {y} = {_APPLY[o](x, y)}." for o, x, y in steps(op, a, b, c)]
    return " ".join([*lines, f"The answer is {answer}."])


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


def templates(difficulty: int) -> list[Template]:
    if difficulty not in (1, 2, 3, 4):
        raise ValueError(f"difficulty={difficulty!r}: must be 1, 2, 3 or 4")
    return {1: ADD + SUB, 2: ADD + SUB + MUL, 3: TWO_STEP, 4: ADD + SUB + TWO_STEP[:1] + TWO_STEP[2:]}[difficulty]


def messages(question: str) -> Content:
    """The question alone: the default teacher answered more held-out problems without the instructions (0.183)
    than with them as a system prompt (0.120; 300 fact-disjoint problems, greedy), and the prompt is half as long."""
    return Content(messages=(("user", question),))


def with_instructions(question: str) -> Content:
    """The other phrasing the task declares: the answer format as a system prompt (the teacher is tried in both)."""
    return Content(messages=(("system", SYSTEM_PROMPT), ("user", question)))


def generate(n_train: int, n_eval: int, seed: int = 0, difficulty: int = 1) -> list[Example]:
    """`n_train` training and `n_eval` held-out problems (distinct questions, fact-disjoint), reproducible."""
    rng = random.Random(f"{NAME}/{seed}/{difficulty}")
    table = templates(difficulty)

    def draw(wanted: dict[str, int]) -> Example | None:
        op, text, fn = rng.choice(table)
        a, b, c = _numbers(rng, op, difficulty)
        slots = _slots(rng)
        question = text.format(a=a, b=b, c=c, **{k: getattr(slots, k) for k in _SLOT_NAMES})
        facts = [fact_key(*step) for step in steps(op, a, b, c)]
        split = problem_split(facts)
        if split is None:
            return None
        answer = fn(a, b, c)
        return Example(
            id=f"mwp-d{difficulty}-{hashlib.sha256(question.encode()).hexdigest()[:12]}",
            content=messages(question),
            variants={INSTRUCTIONS: with_instructions(question)},
            reference=solution(op, a, b, c, answer),
            split=split,
            metadata={"op": op, "facts": " ".join(facts), "answer": str(answer), "difficulty": str(difficulty)},
        )

    return fill_splits(n_train, n_eval, draw, f"problems at difficulty {difficulty}")


_SLOT_NAMES = [
    "name", "pron", "Pron", "name2", "obj", "food", "kind1", "kind2", "container", "place", "verb", "day1", "day2",
]  # fmt: skip
