"""`distillery bench scale`: 1 vs 2 teacher workers, serving replicas and trainer ranks, side by side in one run.

On a 2-core machine the point is correctness and overhead, not speed-up: each part reports both sides' figures,
the ratio of their throughputs, and what the second replica or rank must get right (no prompt lost after kill -9
of a teacher worker; no failed request across serving replicas; the same losses for 1 and 2 trainer ranks).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARTS = ("teacher", "serving", "trainer")


def _ratio(two: float | None, one: float | None) -> float | None:
    if not one or two is None:
        return None
    return round(two / one, 3)


def _max_loss_gap(one: list[float], two: list[float]) -> float | None:
    pairs = list(zip(one, two, strict=False))
    if not pairs:
        return None
    return max(abs(a - b) for a, b in pairs)


def teacher_part(workdir: Path, prompts: int, max_tokens: int) -> dict[str, Any]:
    from services.bench.scale_teacher import measure_teacher

    one = measure_teacher(1, prompts=prompts, max_tokens=max_tokens, workdir=workdir / "teacher-1")
    two = measure_teacher(2, prompts=prompts, max_tokens=max_tokens, workdir=workdir / "teacher-2")
    takeover = two.get("takeover") or {}
    return {
        "one": one,
        "two": two,
        "tokens_per_s_ratio": _ratio(two.get("tokens_per_s"), one.get("tokens_per_s")),
        "rebalance_s": takeover.get("rebalance_s"),
        "lost_prompts": (one.get("lost") or 0) + (two.get("lost") or 0) + (takeover.get("lost") or 0),
        "leftover_processes": takeover.get("leftover_processes"),
    }


def serving_part(duration_s: float, max_tokens: int) -> dict[str, Any]:
    from services.bench.scale_serving import measure_serving

    common: dict[str, Any] = {"duration_s": duration_s, "max_tokens": max_tokens}
    # One replica on one core is the per-replica baseline for two replicas on a core each (see scale_serving).
    # The default student is pruned once and cached in the distillery home, so the serving part uses that home.
    one = measure_serving(1, max_cores=1, **common)
    two = measure_serving(2, **common)
    return {
        "one": one,
        "two": two,
        "tokens_per_s_ratio": _ratio(two.get("tokens_per_s"), one.get("tokens_per_s")),
        "failed_requests": (one.get("failed_requests") or 0) + (two.get("failed_requests") or 0),
    }


def trainer_part(steps: int) -> dict[str, Any]:
    from services.bench.scale_trainer import measure_trainer

    one = measure_trainer(1, steps=steps)
    two = measure_trainer(2, steps=steps)
    gap = _max_loss_gap(one.get("losses") or [], two.get("losses") or [])
    return {
        "one": one,
        "two": two,
        "samples_per_s_ratio": _ratio(two.get("samples_per_s"), one.get("samples_per_s")),
        "step_time_ratio": _ratio(two.get("step_s_mean"), one.get("step_s_mean")),
        "first_losses_max_abs_diff": gap,
    }


def run_scale(
    parts: tuple[str, ...] = PARTS,
    *,
    workdir: Path,
    teacher_prompts: int = 128,
    max_tokens: int = 64,
    serving_duration_s: float = 30.0,
    trainer_steps: int = 20,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Runs the chosen parts one after another (never two at once: they would share the 2 cores)."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {list(PARTS)}")
    result: dict[str, Any] = {"cpu_count": os.cpu_count(), "parts": list(parts)}
    for part in parts:
        progress(f"scale: {part} 1 vs 2 ...")
        start = time.monotonic()
        if part == "teacher":
            result["teacher"] = teacher_part(workdir, teacher_prompts, max_tokens)
        elif part == "serving":
            result["serving"] = serving_part(serving_duration_s, max_tokens)
        else:
            result["trainer"] = trainer_part(trainer_steps)
        result[part]["wall_s"] = round(time.monotonic() - start, 1)
        progress(f"scale: {part} done in {result[part]['wall_s']} s")
    return _finite(result)


def _finite(value: Any) -> Any:
    """JSON has no Infinity/NaN: such figures become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
