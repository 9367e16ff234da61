"""A distillation job, checked before anything starts: prompts, splits, checker, student recipe, teacher folder.

`load_job` reads and validates everything a run needs from the user's side, so a typo in line 9,000 of a prompts
file or a checker module that does not import fails in a second with a message naming the line and field, not
twenty minutes into a run.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from google.protobuf import json_format

from services.common import pb
from services.demo.profiles import Profile, Recipe
from services.tasks import Example, parse_checker, read_examples
from services.tasks.checkers import CheckerError
from services.tasks.dataset import DEFAULT_EVAL_FRACTION, DatasetError, assign_splits, merge

TEACHER_CHOICES = ("default", "tiny")


class JobError(ValueError):
    """Something about the job the user must fix; the message says what and where."""


@dataclass
class Job:
    #: A label for the use case (the prompts file's name, or the built-in task's): samples and runs carry it.
    name: str
    #: "default" (the packaged teacher), "tiny" (a random tiny model, for smoke runs) or a model folder.
    teacher: str
    examples: list[Example]
    checker: str
    profile: Profile
    recipe: Recipe
    student: pb.trainer.StudentRecipe | None = None
    #: How independent the held-out split is, in words (the report prints it).
    held_out: str = ""
    #: Modules a python: checker comes from (the trainer may import only these), and the folder to import them from.
    checker_modules: list[str] = field(default_factory=list)
    python_path: list[str] = field(default_factory=list)
    on_policy_fraction: float | None = None
    #: Overrides of the profile's gate: the metric ("" = by the checker) and its threshold.
    gate_metric: str = ""
    gate_min_score: float | None = None

    @property
    def train(self) -> list[Example]:
        return [e for e in self.examples if e.split == "train"]

    @property
    def eval(self) -> list[Example]:
        return [e for e in self.examples if e.split == "eval"]


def _checker(spec: str) -> tuple[list[str], list[str]]:
    """Validates a checker spec by building it; (modules a python: checker needs, folder to import it from)."""
    if not spec:
        return [], []
    cwd = os.getcwd()
    if spec.startswith("python:") and cwd not in sys.path:
        sys.path.insert(0, cwd)  # a user's checker module next to their prompts, as `python -m` would find it
    try:
        parse_checker(spec)
    except CheckerError as exc:
        raise JobError(f"--checker: {exc}") from None
    if spec.startswith("python:"):
        return [spec.removeprefix("python:").rpartition(":")[0]], [cwd]
    return [], []


def student_recipe(text: str) -> pb.trainer.StudentRecipe:
    """`--student`: a JSON file or inline JSON of a StudentRecipe (e.g. {"pruned": {"num_layers": 6}})."""
    raw = Path(text).read_text() if not text.lstrip().startswith("{") and Path(text).is_file() else text
    try:
        return json_format.Parse(raw, pb.trainer.StudentRecipe())
    except json_format.ParseError as exc:
        raise JobError(f'--student: not a StudentRecipe: {exc} (e.g. {{"pruned": {{"num_layers": 6}}}})') from None


def check_teacher(teacher: str, examples: list[Example]) -> None:
    """A teacher folder exists, holds safetensors and a config, and has a chat template when prompts are chats."""
    if teacher in TEACHER_CHOICES:
        return
    from services.common.models import ModelError, check_safe_folder

    folder = Path(teacher)
    if not folder.is_dir():
        raise JobError(f"--teacher {teacher!r}: not a folder (or use one of {', '.join(TEACHER_CHOICES)})")
    if not (folder / "config.json").is_file():
        raise JobError(f"--teacher {teacher!r}: no config.json: not a Hugging Face model folder")
    try:
        check_safe_folder(folder)
    except ModelError as exc:
        raise JobError(f"--teacher: {exc}") from None
    if any(e.content.messages for e in examples) and not _has_chat_template(folder):
        raise JobError(f"--teacher {teacher!r}: the prompts are chats but the model has no chat template; give "
                       "them as \"prompt\" text instead")  # fmt: skip


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def load_job(
    prompts: Path,
    *,
    profile: Profile,
    recipe: Recipe,
    teacher: str | None = None,
    eval_file: Path | None = None,
    checker: str = "",
    student: str | None = None,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    split_seed: int = 0,
    name: str | None = None,
    held_out: str = "",
    on_policy_fraction: float | None = None,
    gate_metric: str = "",
    gate_min_score: float | None = None,
) -> Job:
    """Reads and checks everything; raises JobError (or DatasetError, a JobError's sibling) with what to fix."""
    try:
        examples = read_examples(prompts)
        if eval_file is not None:
            # With an eval file, its lines are the held-out split and the prompts file is all training.
            held = read_examples(eval_file, force_split="eval")
            examples = merge([replace(e, split=e.split or "train") for e in examples], held)
        examples = assign_splits(examples, eval_fraction, split_seed)
    except (DatasetError, ValueError) as exc:
        raise JobError(str(exc)) from None
    if not any(e.split == "eval" for e in examples):
        raise JobError(f"{prompts}: no held-out prompts: mark some with \"split\": \"eval\", give --eval FILE, or "
                       "raise --eval-fraction")  # fmt: skip
    if not any(e.split == "train" for e in examples):
        raise JobError(f"{prompts}: no training prompts: every line is in the eval split")
    if checker and not any(e.reference is not None for e in examples if e.split == "eval"):
        raise JobError(f"--checker {checker}: no held-out prompt has a reference to check answers against")
    modules, path = _checker(checker)
    chosen = teacher or profile.teacher
    check_teacher(chosen, examples)
    if on_policy_fraction is not None and not 0.0 <= on_policy_fraction <= 1.0:
        raise JobError(f"--on-policy-fraction {on_policy_fraction}: must be in [0, 1]")
    from services.trainer.recipes import GATE_METRICS

    if gate_metric and gate_metric not in GATE_METRICS:
        raise JobError(f"--gate-metric {gate_metric!r}: must be one of {', '.join(GATE_METRICS)}")
    if gate_metric == "accuracy" and not checker:
        raise JobError("--gate-metric accuracy needs --checker (without one, gate on teacher_agreement)")
    if not held_out:
        held_out = (
            f"split from the file (--eval {eval_file.name})" if eval_file is not None
            else f"the file's own splits, else a seeded hash of each id ({eval_fraction:.0%} held out)"
        )  # fmt: skip
    return Job(
        name=name or prompts.stem,
        teacher=chosen,
        examples=examples,
        checker=checker,
        profile=profile,
        recipe=recipe,
        student=student_recipe(student) if student else None,
        held_out=held_out,
        checker_modules=modules,
        python_path=path,
        on_policy_fraction=on_policy_fraction,
        gate_metric=gate_metric,
        gate_min_score=gate_min_score,
    )
