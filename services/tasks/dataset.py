"""Prompts as data: the JSONL a user distils on, parsed and checked before any service starts.

One line is one prompt:

    {"id": "q1", "messages": [{"role": "system", "content": "…"}, {"role": "user", "content": "…"}],
     "reference": "…", "split": "train"}
    {"id": "q2", "prompt": "raw text, no chat template"}

- `id` (string or integer, unique in the file) and exactly one of `messages` (roles system/user/assistant, the
  last one from the user) or `prompt` are required.
- `reference` (optional): the correct answer or a worked solution; a checker compares answers with it, and the
  `best` recipe may train on it.
- `split` (optional): "train" or "eval". Lines without one are split by `assign_splits`: a seeded hash of the
  id sends `eval_fraction` (default 10%) of them to the held-out split, the same way on every run.
- `variants` (optional): other ways to ask the teacher the same question, `{"name": messages-or-prompt}`; held-out
  prompts are also answered by the teacher in each variant, and the teacher is compared at its best one.
- `metadata` (optional): an object of strings, carried along (e.g. the facts a math problem uses).

Every problem is reported with its line number and field (`prompts.jsonl:12: messages[1].role: …`); nothing is
dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FIELDS = ("id", "messages", "prompt", "reference", "split", "variants", "metadata")
ROLES = ("system", "user", "assistant")
SPLITS = ("train", "eval")
MAX_ID_LENGTH = 200
DEFAULT_EVAL_FRACTION = 0.1
#: Errors listed in one DatasetError before the rest are only counted.
MAX_ERRORS = 20

Message = dict[str, str]


@dataclass(frozen=True)
class Content:
    """What the model is asked: chat messages (the chat template is applied) or a raw prompt."""

    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""

    def chat(self) -> list[Message]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def to_json(self) -> Any:
        return self.chat() if self.messages else self.prompt

    def without_system(self) -> Content | None:
        """The same conversation without its system messages (None when it has none, or is a raw prompt)."""
        if not any(role == "system" for role, _ in self.messages):
            return None
        rest = tuple(m for m in self.messages if m[0] != "system")
        return Content(messages=rest) if rest else None


@dataclass(frozen=True)
class Example:
    id: str
    content: Content
    reference: str | None = None
    split: str | None = None
    variants: dict[str, Content] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        out["messages" if self.content.messages else "prompt"] = self.content.to_json()
        if self.reference is not None:
            out["reference"] = self.reference
        if self.split is not None:
            out["split"] = self.split
        if self.variants:
            out["variants"] = {name: c.to_json() for name, c in self.variants.items()}
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out


class DatasetError(ValueError):
    """A prompts file that cannot be used; `problems` holds one "file:line: field: why" string per problem."""

    def __init__(self, path: Path, problems: list[str], more: int = 0) -> None:
        self.problems = problems
        tail = f"\n  … and {more} more" if more else ""
        super().__init__(f"{path}: {len(problems) + more} problem(s):\n  " + "\n  ".join(problems) + tail)


class _Bad(ValueError):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")


def _messages(value: Any, where: str) -> Content:
    if not isinstance(value, list) or not value:
        raise _Bad(where, 'must be a non-empty list of {"role": …, "content": …}')
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            raise _Bad(f"{where}[{i}]", "must be an object with exactly role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _Bad(f"{where}[{i}].role", f"{role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _Bad(f"{where}[{i}].content", f"must be a string, got {type(content).__name__}")
        out.append((role, content))
    if out[-1][0] != "user":
        raise _Bad(f"{where}[{len(out) - 1}].role", f"the last message must be the user's, got {out[-1][0]!r}")
    if not any(content.strip() for _, content in out):
        raise _Bad(where, "every message is empty")
    return Content(messages=tuple(out))


def _content(value: Any, where: str) -> Content:
    if isinstance(value, str):
        if not value.strip():
            raise _Bad(where, "must not be empty")
        return Content(prompt=value)
    return _messages(value, where)


def parse_example(obj: Any) -> Example:
    """One decoded JSON line → `Example`; raises ValueError("field: why")."""
    if not isinstance(obj, dict):
        raise _Bad("line", f"must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise _Bad(unknown[0], f"unknown field; a line has {', '.join(FIELDS)}")
    raw_id = obj.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise _Bad("id", "required: a string or an integer")
    example_id = str(raw_id)
    if not example_id.strip() or len(example_id) > MAX_ID_LENGTH:
        raise _Bad("id", f"must be 1–{MAX_ID_LENGTH} characters")
    if ("messages" in obj) == ("prompt" in obj):
        raise _Bad("messages", "give exactly one of messages or prompt")
    if "messages" in obj:
        content = _messages(obj["messages"], "messages")
    else:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise _Bad("prompt", "must be a non-empty string")
        content = Content(prompt=obj["prompt"])
    reference = obj.get("reference")
    if reference is not None and (not isinstance(reference, str | int | float) or isinstance(reference, bool)):
        raise _Bad("reference", f"must be a string or a number, got {type(reference).__name__}")
    if reference is not None and not str(reference).strip():
        raise _Bad("reference", "must not be empty (leave the field out instead)")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise _Bad("split", f"{split!r} is not one of {', '.join(SPLITS)}")
    variants_raw = obj.get("variants", {})
    if not isinstance(variants_raw, dict):
        raise _Bad("variants", "must be an object of name → messages or prompt")
    variants = {}
    for name, value in variants_raw.items():
        if not name or len(name) > 64:
            raise _Bad("variants", f"variant name {name!r} must be 1–64 characters")
        variants[name] = _content(value, f"variants.{name}")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str | int | float) for v in metadata.values()):
        raise _Bad("metadata", "must be an object of strings")
    return Example(
        id=example_id,
        content=content,
        reference=None if reference is None else str(reference),
        split=split,
        variants=variants,
        metadata={str(k): str(v) for k, v in metadata.items()},
    )


def read_examples(path: Path, force_split: str | None = None) -> list[Example]:
    """Every line of a JSONL prompts file, or a DatasetError listing what is wrong (with line numbers).

    `force_split` ("eval" for an --eval file) is the split of lines that give none; a line that gives the other
    split is an error.
    """
    if not path.is_file():
        raise DatasetError(path, [f"{path}: no such file"])
    examples: list[Example] = []
    problems: list[str] = []
    more = 0
    first_line: dict[str, int] = {}

    def problem(text: str) -> None:
        nonlocal more
        if len(problems) < MAX_ERRORS:
            problems.append(text)
        else:
            more += 1

    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = list(enumerate(f, start=1))
        except UnicodeDecodeError as exc:
            raise DatasetError(path, [f"{path.name}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problem(f"{where}: not JSON: {exc.msg} at column {exc.colno}")
            continue
        try:
            example = parse_example(obj)
        except ValueError as exc:
            problem(f"{where}: {exc}")
            continue
        if example.id in first_line:
            problem(f"{where}: id: {example.id!r} is also the id of line {first_line[example.id]}")
            continue
        first_line[example.id] = number
        if force_split is not None:
            if example.split not in (None, force_split):
                problem(f"{where}: split: {example.split!r} in a file whose lines are all {force_split!r}")
                continue
            example = replace(example, split=force_split)
        examples.append(example)
    if problems:
        raise DatasetError(path, problems, more)
    if not examples:
        raise DatasetError(path, [f"{path.name}: no prompts (the file is empty)"])
    return examples


def hash_split(example_id: str, eval_fraction: float, seed: int) -> str:
    """The split of an id: the first 8 hex digits of sha256("{seed}/{id}"), eval below eval_fraction × 2^32."""
    bucket = int(hashlib.sha256(f"{seed}/{example_id}".encode()).hexdigest()[:8], 16)
    return "eval" if bucket < eval_fraction * 2**32 else "train"


def assign_splits(
    examples: Sequence[Example], eval_fraction: float = DEFAULT_EVAL_FRACTION, seed: int = 0
) -> list[Example]:
    """Examples with a split each: their own, or one from `hash_split` (reproducible, independent of file order)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}: must be in [0, 1)")
    return [e if e.split else replace(e, split=hash_split(e.id, eval_fraction, seed)) for e in examples]


def merge(train: Sequence[Example], held_out: Sequence[Example]) -> list[Example]:
    """A prompts file and an --eval file as one set; an id in both is an error."""
    both = {e.id for e in train} & {e.id for e in held_out}
    if both:
        raise ValueError(f"ids in both the prompts and the eval file: {sorted(both)[:5]}")
    return [*train, *held_out]


def counts(examples: Iterable[Example]) -> dict[str, int]:
    out = {split: 0 for split in SPLITS}
    for e in examples:
        out[e.split or "unassigned"] = out.get(e.split or "unassigned", 0) + 1
    return out


def fill_splits(
    n_train: int, n_eval: int, draw: Callable[[dict[str, int]], Example | None], what: str, tries: int = 200
) -> list[Example]:
    """`n_train` training and `n_eval` held-out examples from a generator's `draw` (called with the counts still
    wanted; None or a repeated id is tried again), in the order drawn; a ValueError when it cannot find enough."""
    wanted = {"train": n_train, "eval": n_eval}
    out: list[Example] = []
    seen: set[str] = set()
    for _ in range(tries * (n_train + n_eval) + 1000):
        if not any(wanted.values()):
            return out
        example = draw(wanted)
        if example is None or example.id in seen or wanted.get(example.split or "", 0) <= 0:
            continue
        seen.add(example.id)
        wanted[example.split or ""] -= 1
        out.append(example)
    if any(wanted.values()):
        raise ValueError(f"not enough distinct {what}: {wanted} still wanted")
    return out


def write_examples(path: Path, examples: Iterable[Example]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n
