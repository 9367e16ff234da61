"""Calibration data for pruning and for choosing a restricted output vocabulary: the first training samples of the
run's own stream (the user's prompts and the teacher's answers to them), read through the run's intake so that
nothing is read twice or skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from services.common import pb
from services.trainer.buffer import SAMPLE, Item, ReplayBuffer
from services.trainer.intake import Intake


def needs_calibration(recipe: pb.trainer.StudentRecipe, teacher_config: dict[str, Any]) -> bool:
    """Whether making this student reads activation statistics: importance-based layers or any width pruning."""
    if recipe.WhichOneof("source") not in ("pruned", None):
        return False
    pruned = recipe.pruned
    if pruned.layer_selection == pb.trainer.LAYER_SELECTION_IMPORTANCE:
        return True
    narrower = {
        "hidden_size": pruned.hidden_size,
        "intermediate_size": pruned.intermediate_size,
        "num_attention_heads": pruned.num_attention_heads,
        "num_key_value_heads": pruned.num_key_value_heads,
    }
    return any(0 < value < int(teacher_config.get(name, value)) for name, value in narrower.items())


def collect_calibration(
    intake: Intake,
    buffer: ReplayBuffer,
    n: int,
    stop: threading.Event,
    on_wait: Callable[[], None],
    idle_s: float = 10.0,
) -> list[Item] | None:
    """The buffer's first items up to the `n`-th training sample (the samples, and the reference-answer items that
    came with them); None when stopped while waiting. `sequences` gives pruning its token ids.

    The items stay in the buffer, fresh: they are trained on like any other. Waits as long as the stream has no
    training sample (a run cannot train without one either), publishing progress while it waits; with fewer than
    `n`, takes what there is once nothing new has arrived for `idle_s`.
    """
    last_new = time.monotonic()
    while not stop.is_set():
        items = buffer.items()
        samples = [i for i, it in enumerate(items) if it.kind == SAMPLE][:n]
        if len(samples) >= n or (samples and (buffer.room() <= 0 or time.monotonic() - last_new > idle_s)):
            return items[: samples[-1] + 1]
        if intake.poll(0.5) > 0:
            last_new = time.monotonic()
        else:
            on_wait()
    return None


def sequences(items: list[Item]) -> list[list[int]]:
    """Token ids (prompt + completion) of the training samples among `items`: pruning's calibration sequences."""
    return [it.input_ids for it in items if it.kind == SAMPLE]
