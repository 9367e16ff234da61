"""`distillery bench rescore`: every checkpoint of a run scored again on a larger held-out draw of a built-in use case.

The demo judges each checkpoint on its own held-out prompts (200 by default: ±5–6 points at 95% confidence), too few
to tell two students of similar accuracy apart. This scores every checkpoint of a run's registry on `problems`
held-out prompts of the use case (its held-out split: for the math task, problems over the same held-out arithmetic
facts as the demo's, a new draw that may include some of the demo's own), with the use case's checker and the
trainer's own greedy generation (`services.trainer.evaluate.greedy_answers`), so the figures compare with the
report's. Each checkpoint is verified against its manifest first (safetensors only); one that fails is refused,
named, and the rest are scored.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.common.registry import CheckpointError, Registry, verify

Log = Callable[[str], None]


class RescoreError(ValueError):
    """A run folder or use case this command cannot score (the message says which and why)."""


def registry_of(folder: Path) -> Registry:
    """The registry of a run folder (`<run>/registry`, as `distillery demo` and `distil` write it) or a registry."""
    for root in (folder / "registry", folder):
        if (root / "checkpoints").is_dir():
            return Registry(root)
    raise RescoreError(f"{folder}: neither a run folder with registry/checkpoints nor a registry")


def held_out(task_name: str, problems: int, seed: int) -> tuple[list[Any], Any]:
    """(`problems` held-out examples of the built-in use case, its checker)."""
    from services.tasks.builtin import get_builtin
    from services.tasks.checkers import parse_checker

    try:
        task = get_builtin(task_name)
    except ValueError as exc:
        raise RescoreError(str(exc)) from None
    examples = [e for e in task.generate(0, problems, seed) if e.split == "eval"]
    return examples, parse_checker(task.checker)


def prompt_ids(tokenizer: Any, examples: Sequence[Any]) -> list[list[int]]:
    """Each example as the student was trained on it: its chat (or raw prompt) in the chat format."""
    out = []
    for e in examples:
        if e.content.messages:
            ids = tokenizer.apply_chat_template(e.content.chat(), add_generation_prompt=True, tokenize=True)
            ids = ids if isinstance(ids, list) else ids["input_ids"]
        else:
            ids = tokenizer.encode(e.content.prompt)
        out.append([int(t) for t in ids])
    return out


def answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """The model's greedy answers, as the trainer's evaluation makes them."""
    from services.common.cpu import native_bf16
    from services.trainer.evaluate import greedy_answers

    return greedy_answers(model, tokenizer, prompts, max_new_tokens, autocast=native_bf16())


def rescore_run(
    folder: Path, task: str, problems: int, seed: int, max_new_tokens: int, log: Log = print
) -> dict[str, Any]:
    """Accuracy of every checkpoint of the run in `folder` (oldest first), with the best, the last and the mean."""
    import torch

    from services.common.models import load_causal_lm, load_tokenizer

    registry = registry_of(folder)
    checkpoints = registry.checkpoints()
    if not checkpoints:
        raise RescoreError(f"{folder}: the registry holds no checkpoints")
    examples, checker = held_out(task, problems, seed)
    scored: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    prompts: list[list[int]] | None = None
    for ckpt in checkpoints:
        started = time.monotonic()
        try:
            verify(ckpt.path)
        except CheckpointError as exc:
            refused.append({"version": ckpt.version, "why": str(exc)})
            log(f"{folder.name} v{ckpt.version}: refused: {exc}")
            continue
        tokenizer = load_tokenizer(ckpt.path)
        prompts = prompts or prompt_ids(tokenizer, examples)
        model = load_causal_lm(ckpt.path, dtype=torch.float32).eval()
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
        "last": accuracies[-1] if accuracies else None,
        "mean": round(statistics.mean(accuracies), 4) if accuracies else None,
    }


def rescore(
    folders: Sequence[Path], task: str, problems: int, seed: int, max_new_tokens: int, log: Log = print
) -> dict[str, Any]:
    """`rescore_run` for each folder, on one draw of held-out problems."""
    if problems < 1:
        raise RescoreError(f"problems={problems}: must be at least 1")
    return {
        "task": task,
        "problems": problems,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "runs": [rescore_run(f, task, problems, seed, max_new_tokens, log) for f in folders],
    }
