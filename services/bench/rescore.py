"""`distillery bench rescore`: every checkpoint of a run scored again on a larger held-out draw of a built-in use case.

The demo judges each checkpoint on its own held-out prompts (200 by default: ±5–6 points at 95% confidence), too few
to tell two students of similar accuracy apart. This scores every checkpoint of a run's registry on `problems`
held-out prompts of the use case (its held-out split: for the math task, problems over the same held-out arithmetic
facts as the demo's), with the use case's checker and the trainer's own greedy generation
(`services.trainer.evaluate.greedy_answers`), so the figures compare with the report's. The held-out prompts of the
runs themselves (the `"split": "eval"` lines of the JSONL files in their folders, which the demo's gate chose its
checkpoints on) are left out of the draw, so "best" is not flattered by them. Every checkpoint folder is verified
against its manifest first (safetensors only); one that fails, or that does not load, is refused by name and the rest
are scored.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.common.models import ModelError
from services.common.registry import CheckpointError, verify

Log = Callable[[str], None]


class RescoreError(ValueError):
    """A run folder or use case this command cannot score (the message says which and why)."""


def checkpoint_folders(folder: Path) -> list[Path]:
    """The checkpoint folders of a run folder (`<run>/registry`, as `distillery demo` and `distil` write it) or of a
    registry, oldest first (their names start with the version)."""
    for root in (folder / "registry" / "checkpoints", folder / "checkpoints"):
        if root.is_dir():
            found = sorted(p for p in root.iterdir() if p.is_dir())
            if not found:
                raise RescoreError(f"{folder}: the registry holds no checkpoints")
            return found
    raise RescoreError(f"{folder}: neither a run folder with registry/checkpoints nor a registry")


def runs_held_out_ids(folders: Sequence[Path]) -> set[str]:
    """Ids of the held-out lines (`"split": "eval"`) of the JSONL files directly in each folder."""
    ids: set[str] = set()
    for folder in folders:
        for file in folder.glob("*.jsonl"):
            for line in file.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("split") == "eval" and isinstance(row.get("id"), str):
                    ids.add(row["id"])
    return ids


def held_out(task_name: str, problems: int, seed: int, exclude: set[str] | None = None) -> tuple[list[Any], Any]:
    """(`problems` held-out examples of the built-in use case, none of whose ids is in `exclude`; its checker)."""
    from services.tasks.builtin import get_builtin
    from services.tasks.checkers import parse_checker

    try:
        task = get_builtin(task_name)
    except ValueError as exc:
        raise RescoreError(str(exc)) from None
    exclude = exclude or set()
    drawn = [e for e in task.generate(0, problems + len(exclude), seed) if e.split == "eval" and e.id not in exclude]
    return drawn[:problems], parse_checker(task.checker)


def prompt_ids(tokenizer: Any, examples: Sequence[Any]) -> list[list[int]]:
    """Each example as the student was trained on it: a chat in the chat format, a raw prompt encoded as it is."""
    from services.bench.output_vocab import prompt_ids as chat_ids

    return [
        chat_ids(tokenizer, e.content.chat())
        if e.content.messages
        else [int(t) for t in tokenizer.encode(e.content.prompt)]
        for e in examples
    ]


def answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """The model's greedy answers, as the trainer's evaluation makes them."""
    from services.common.cpu import native_bf16
    from services.trainer.evaluate import greedy_answers

    return greedy_answers(model, tokenizer, prompts, max_new_tokens, autocast=native_bf16())


def rescore_run(
    folder: Path,
    checkpoints: Sequence[Path],
    examples: Sequence[Any],
    checker: Any,
    max_new_tokens: int,
    log: Log = print,
) -> dict[str, Any]:
    """Accuracy of each of the run's `checkpoints` (`checkpoint_folders(folder)`) on `examples`. "best", "last" (the
    newest checkpoint scored, with its step) and "mean" are over the checkpoints scored: every one the trainer
    registered, which may include one written when the run stopped."""
    import torch

    from services.common.models import load_causal_lm, load_tokenizer

    scored: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    prompts: list[list[int]] | None = None
    for path in checkpoints:
        started = time.monotonic()
        try:
            ckpt = verify(path)
            tokenizer = load_tokenizer(path)
            prompts = prompts or prompt_ids(tokenizer, examples)
            model = load_causal_lm(path, dtype=torch.float32).eval()
        except (CheckpointError, ModelError, OSError, ValueError) as exc:
            refused.append({"checkpoint": path.name, "why": str(exc)})
            log(f"{folder.name} {path.name}: refused: {exc}")
            continue
        said = answers(model, tokenizer, prompts, max_new_tokens)
        accuracy = sum(bool(checker(a, e.reference)) for a, e in zip(said, examples, strict=True)) / len(examples)
        scored.append({"version": ckpt.version, "step": ckpt.manifest.step, "accuracy": round(accuracy, 4)})
        log(f"{folder.name} v{ckpt.version} (step {ckpt.manifest.step}): accuracy {accuracy:.4f} on "
            f"{len(examples)} problems, {time.monotonic() - started:.1f} s")  # fmt: skip
    accuracies = [s["accuracy"] for s in scored]
    return {
        "run": str(folder),
        "checkpoints": scored,
        "refused": refused,
        "best": max(accuracies) if accuracies else None,
        "last": scored[-1] if scored else None,
        "mean": round(statistics.mean(accuracies), 4) if accuracies else None,
    }


def rescore(
    folders: Sequence[Path], task: str, problems: int, seed: int, max_new_tokens: int, log: Log = print
) -> dict[str, Any]:
    """`rescore_run` for each folder, on one draw of held-out problems that leaves out every run's own held-out
    prompts. Every folder is checked before any is scored."""
    if problems < 1:
        raise RescoreError(f"problems={problems}: must be at least 1")
    checkpoints = [checkpoint_folders(folder) for folder in folders]  # every folder checked before any is scored
    exclude = runs_held_out_ids(folders)
    examples, checker = held_out(task, problems, seed, exclude)
    if len(examples) < problems:
        raise RescoreError(f"task={task}: only {len(examples)} held-out problems outside the runs' own could be drawn")
    log(f"{len(examples)} held-out problems of {task} (seed {seed}), {len(exclude)} of the runs' own left out")
    return {
        "task": task,
        "problems": len(examples),
        "seed": seed,
        "left_out_runs_held_out": len(exclude),
        "max_new_tokens": max_new_tokens,
        "runs": [
            rescore_run(f, found, examples, checker, max_new_tokens, log)
            for f, found in zip(folders, checkpoints, strict=True)
        ],
    }
