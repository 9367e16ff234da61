"""The untrained students the benchmarks serve: the trainer's default student, and the same with a restricted head.

Both are built once and cached under the models folder. The restricted head (`services/common/outvocab.py`) keeps
the tokens of the default use case's text: its questions and worked references in the teacher's chat format, plus
every special token, at the given coverage; its coverage of another draw of references (other
problems, another seed) is recorded beside it in `output_vocab.json`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

STUDENT_CACHE = "bench-default-student"
#: References the head's tokens are counted over, and the other draw its coverage is checked on.
COUNT_EXAMPLES = 4000
CHECK_EXAMPLES = 1000


def cache_name() -> str:
    """The cached default student's folder name: it names the recipe's shape (with a digest of the whole recipe), so
    a changed default is built afresh rather than read from an old cache."""
    from services.trainer.recipes import DEFAULT_STUDENT_RECIPE

    p = DEFAULT_STUDENT_RECIPE.pruned
    digest = hashlib.sha256(DEFAULT_STUDENT_RECIPE.SerializeToString(deterministic=True)).hexdigest()[:8]
    return f"{STUDENT_CACHE}-{p.num_layers}x{p.hidden_size}-{digest}"


def full_default_student(models_dir: Path, teacher_dir: Path) -> Path:
    target = models_dir / cache_name()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from services.trainer.recipes import DEFAULT_STUDENT_RECIPE
    from services.trainer.student import make_student

    staging = models_dir / f".{target.name}.{uuid.uuid4().hex}"
    make_student(teacher_dir, DEFAULT_STUDENT_RECIPE, staging, calibration_sequences(teacher_dir), dtype="bfloat16")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def calibration_sequences(teacher_dir: Path, n: int = 64) -> list[list[int]]:
    """Token ids of `n` prompts of the default built-in use case and their references, in the teacher's chat format:
    what the untrained default student is pruned with when a benchmark builds one."""
    from services.common.models import load_tokenizer

    tokenizer = load_tokenizer(teacher_dir)
    return [answer_ids(tokenizer, chat, reference, prompt=True) for chat, reference in _examples(n, seed=1234)]


def _examples(n: int, seed: int) -> list[tuple[list[dict[str, str]], str]]:
    from services.tasks.builtin import default_prompts

    return [(e.content.chat(), e.reference or "") for e in default_prompts(n, seed=seed)]


def answer_ids(tokenizer: Any, chat: list[dict[str, str]], reference: str, prompt: bool = False) -> list[int]:
    """The chat with `reference` as the assistant's turn, tokenized with the chat template: the whole sequence with
    `prompt`, else only the answer's tokens (the end-of-turn tokens included)."""

    def ids(messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        return [int(t) for t in (out if isinstance(out, list) else out["input_ids"])]

    whole = ids([*chat, {"role": "assistant", "content": reference}], False)
    return whole if prompt else whole[len(ids(chat, True)) :]


def use_case_token_counts(tokenizer: Any, n: int, seed: int) -> Counter[int]:
    """Tokens of `n` questions and their worked answers in the chat format: a trained student's answers restate
    the question's words (a 135M teacher's do), so the questions count too."""
    counts: Counter[int] = Counter()
    for chat, reference in _examples(n, seed):
        counts.update(answer_ids(tokenizer, chat, reference, prompt=True))
    return counts


def trimmed_student(models_dir: Path, full: Path, coverage: float) -> Path:
    """`full` with its head restricted to the default use case's answer tokens at `coverage` (cached)."""
    from services.common import outvocab
    from services.common.models import load_tokenizer

    target = models_dir / f"{full.name}-head-{coverage:g}"
    if (target / "config.json").is_file() and (target / "output_vocab.json").is_file():
        return target
    tokenizer = load_tokenizer(full)
    vocab_size = int(json.loads((full / "config.json").read_text())["vocab_size"])
    counts = use_case_token_counts(tokenizer, COUNT_EXAMPLES, seed=7)
    ids = outvocab.select_output_vocab(counts, vocab_size, coverage, always=tokenizer.all_special_ids)
    check = use_case_token_counts(tokenizer, CHECK_EXAMPLES, seed=8)
    staging = models_dir / f".{target.name}.{uuid.uuid4().hex}"
    parameters = outvocab.trim_folder(full, ids, staging)
    (staging / "output_vocab.json").write_text(
        json.dumps(
            {
                "rows": len(ids),
                "coverage_target": coverage,
                "coverage_counted": round(outvocab.coverage_of(ids, counts), 5),
                "coverage_other_draw": round(outvocab.coverage_of(ids, check), 5),
                "counted_from": f"{COUNT_EXAMPLES} questions and worked references of the default use case (seed 7)",
                "checked_on": f"{CHECK_EXAMPLES} other questions and references (seed 8)",
                "parameters": parameters,
            },
            indent=1,
        )
    )
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def output_vocab_info(model_dir: Path) -> dict[str, Any] | None:
    file = model_dir / "output_vocab.json"
    return json.loads(file.read_text()) if file.is_file() else None
