"""The demo's report: a JSON summary, a Markdown page and PNG plots in the run folder.

Figures come from measurements made during the run; the cost per million tokens is an *estimate* from measured
throughput and a machine price per hour that the user sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.settings import READING_TARGET_WPM
from services.serving.loadtest import percentile

# Published results the demo reports against (TinyBERT: 96.8% of the teacher at 7.5× smaller, 9.4× faster).
GOAL_ACCURACY_RATIO = 0.968
GOAL_SIZE_RATIO = 7.5
GOAL_SPEED_RATIO = 9.4


@dataclass
class DemoResult:
    """Everything the report needs; filled in phase by phase."""

    profile: str
    teacher_model: str
    student_recipe: str = ""
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None
    teacher_params: int = 0
    student_params: int = 0
    teacher_tokens_per_s: float | None = None
    student_tokens_per_s: float | None = None
    speed_concurrency: int = 0
    teacher_streams_at_target: int | None = None
    student_streams_at_target: int | None = None
    swaps: int = 0
    failed_requests: int = 0
    streams: int = 0
    stream_wpm: list[float] = field(default_factory=list)
    streams_below_target: int = 0
    served_versions: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    teacher_samples: int = 0
    train_prompts: int = 0
    scored_prompts: int = 0
    eval_prompts: int = 0
    machine_price_per_hour: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _cost_per_million(price_per_hour: float, tokens_per_s: float | None) -> float | None:
    if not tokens_per_s or price_per_hour <= 0:
        return None
    return price_per_hour / (tokens_per_s * 3600) * 1e6


def summary(result: DemoResult) -> dict[str, Any]:
    """The JSON summary `distillery demo --json` prints last."""
    accuracy_ratio = _ratio(result.student_accuracy, result.teacher_accuracy)
    size_ratio = _ratio(result.teacher_params, result.student_params)
    speed_ratio = _ratio(result.student_tokens_per_s, result.teacher_tokens_per_s)
    below = [w for w in result.stream_wpm if w < READING_TARGET_WPM]
    out: dict[str, Any] = {
        "profile": result.profile,
        "teacher_model": result.teacher_model,
        "student_recipe": result.student_recipe,
        "teacher_accuracy": result.teacher_accuracy,
        "student_accuracy": result.student_accuracy,
        "accuracy_ratio": accuracy_ratio,
        "teacher_params": result.teacher_params,
        "student_params": result.student_params,
        "size_ratio": size_ratio,
        "teacher_tokens_per_s": result.teacher_tokens_per_s,
        "student_tokens_per_s": result.student_tokens_per_s,
        "speed_ratio": speed_ratio,
        "speed_concurrency": result.speed_concurrency,
        "teacher_streams_at_target": result.teacher_streams_at_target,
        "student_streams_at_target": result.student_streams_at_target,
        "streams": result.streams,
        "streams_below_target": len(below),
        "stream_wpm_p50": percentile(result.stream_wpm, 50),
        "stream_wpm_p5": percentile(result.stream_wpm, 5),
        "swaps": result.swaps,
        "failed_requests": result.failed_requests,
        "served_versions": result.served_versions,
        "teacher_samples": result.teacher_samples,
        "train_prompts": result.train_prompts,
        "scored_prompts": result.scored_prompts,
        "eval_prompts": result.eval_prompts,
        "cost_estimate": {
            "label": "estimate: machine price per hour / measured tokens per second",
            "machine_price_per_hour_usd": result.machine_price_per_hour,
            "teacher_usd_per_million_tokens": _cost_per_million(
                result.machine_price_per_hour, result.teacher_tokens_per_s
            ),
            "student_usd_per_million_tokens": _cost_per_million(
                result.machine_price_per_hour, result.student_tokens_per_s
            ),
        },
        "goals": {
            "accuracy_ratio_ge_0.968": None if accuracy_ratio is None else accuracy_ratio >= GOAL_ACCURACY_RATIO,
            "student_beats_teacher": None if accuracy_ratio is None else accuracy_ratio > 1.0,
            "size_ratio_ge_7.5": None if size_ratio is None else size_ratio >= GOAL_SIZE_RATIO,
            "speed_ratio_ge_9.4": None if speed_ratio is None else speed_ratio >= GOAL_SPEED_RATIO,
            "every_stream_ge_238_wpm": bool(result.stream_wpm) and not below,
            "zero_failed_requests": result.failed_requests == 0,
        },
        "phases_s": {k: round(v, 1) for k, v in result.phases.items()},
        "notes": result.notes,
        "wall_s": round(result.wall_s, 1),
    }
    return out


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def write_plots(result: DemoResult, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in result.history]
    ax_loss.plot(steps, [h["loss"] for h in result.history], color="tab:blue")
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    ax_acc.plot([e["step"] for e in result.evals], [e.get("accuracy") or 0 for e in result.evals], "o-",
                label="student (held-out)")  # fmt: skip
    if result.teacher_accuracy is not None:
        ax_acc.axhline(result.teacher_accuracy, color="tab:red", linestyle="--", label="teacher")
    ax_acc.set(title="held-out accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    ax_acc.legend()
    fig.tight_layout()
    paths.append(folder / "training.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    if result.stream_wpm:
        ax.hist(result.stream_wpm, bins=40, color="tab:green")
    ax.axvline(READING_TARGET_WPM, color="tab:red", linestyle="--", label=f"{READING_TARGET_WPM:.0f} wpm target")
    ax.set(title=f"served streams: words per minute (n={len(result.stream_wpm)})", xlabel="wpm", ylabel="streams")
    ax.legend()
    fig.tight_layout()
    paths.append(folder / "wpm.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.5))
    panels = [
        ("held-out accuracy", result.teacher_accuracy, result.student_accuracy),
        ("parameters (M)", result.teacher_params / 1e6, result.student_params / 1e6),
        ("tokens/s", result.teacher_tokens_per_s, result.student_tokens_per_s),
        ("streams ≥ 238 wpm", result.teacher_streams_at_target, result.student_streams_at_target),
    ]
    for ax, (title, teacher, student) in zip(axes, panels, strict=True):
        ax.bar(["teacher", "student"], [teacher or 0, student or 0], color=["tab:red", "tab:blue"])
        ax.set_title(title)
    fig.tight_layout()
    paths.append(folder / "teacher_vs_student.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(result: DemoResult, folder: Path) -> dict[str, Any]:
    """Writes report.json, report.md and the plots into `folder`; returns the summary."""
    folder.mkdir(parents=True, exist_ok=True)
    data = summary(result)
    full = {**data, "history": result.history, "evals": result.evals, "checkpoints": result.checkpoints,
            "stream_wpm": result.stream_wpm}  # fmt: skip
    (folder / "report.json").write_text(json.dumps(full, indent=2))
    plots = write_plots(result, folder)
    goals = data["goals"]
    cost = data["cost_estimate"]
    lines = [
        f"# distillery demo — profile `{result.profile}`",
        "",
        f"Teacher `{result.teacher_model}` distilled into a student ({result.student_recipe}) on grade-school math "
        f"word problems: {result.train_prompts} training prompts answered by the teacher (best-of-n, verified), "
        f"{result.scored_prompts} worked solutions scored by the teacher (teacher-forced samples), "
        f"{result.eval_prompts} held-out prompts, "
        f"{result.teacher_samples} teacher samples. Wall time {data['wall_s']} s.",
        "",
        "## Teacher vs student",
        "",
        "| | teacher | student | ratio | goal | met |",
        "|---|---|---|---|---|---|",
        f"| held-out accuracy | {fmt(result.teacher_accuracy)} | {fmt(result.student_accuracy)} | "
        f"{fmt(data['accuracy_ratio'])} | ≥ 0.968 (> 1 is the real goal) | {fmt(goals['accuracy_ratio_ge_0.968'])} |",
        f"| parameters | {result.teacher_params:,} | {result.student_params:,} | {fmt(data['size_ratio'], '.2f')}× "
        f"fewer | ≥ 7.5× | {fmt(goals['size_ratio_ge_7.5'])} |",
        f"| tokens/s through serving ({result.speed_concurrency} streams) | {fmt(result.teacher_tokens_per_s, '.1f')}"
        f" | {fmt(result.student_tokens_per_s, '.1f')} | {fmt(data['speed_ratio'], '.2f')}× | ≥ 9.4× | "
        f"{fmt(goals['speed_ratio_ge_9.4'])} |",
        f"| concurrent streams at ≥ 238 wpm (p50) | {fmt(result.teacher_streams_at_target)} | "
        f"{fmt(result.student_streams_at_target)} | | | |",
        "",
        "## Serving during training",
        "",
        f"{result.streams} client streams were served while the trainer promoted students; {result.swaps} hot-swap"
        f"{'' if result.swaps == 1 else 's'} (versions served: {result.served_versions}); "
        f"{result.failed_requests} failed requests "
        f"(goal 0: {fmt(goals['zero_failed_requests'])}). Streams below 238 wpm: {data['streams_below_target']} "
        f"(p50 {fmt(data['stream_wpm_p50'], '.0f')} wpm, p5 {fmt(data['stream_wpm_p5'], '.0f')} wpm; every stream ≥ "
        f"238: {fmt(goals['every_stream_ge_238_wpm'])}).",
        "",
        "## Cost per million generated tokens (estimate)",
        "",
        f"At ${cost['machine_price_per_hour_usd']}/hour for this machine and the measured throughput: teacher "
        f"${fmt(cost['teacher_usd_per_million_tokens'], '.4f')}, student "
        f"${fmt(cost['student_usd_per_million_tokens'], '.4f')} per million tokens. This is an estimate, not a bill.",
        "",
        "## Evaluations",
        "",
        "| step | student accuracy | teacher accuracy | KL | top-1 agreement | perplexity |",
        "|---|---|---|---|---|---|",
        *[
            f"| {e['step']} | {fmt(e.get('accuracy'))} | {fmt(e.get('teacher_accuracy'))} | {fmt(e.get('kl'))} | "
            f"{fmt(e.get('top1_agreement'))} | {fmt(e.get('perplexity'), '.2f')} |"
            for e in result.evals
        ],
        "",
        "## Plots",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
        "## Phases (seconds)",
        "",
        *[f"- {name}: {secs}" for name, secs in data["phases_s"].items()],
    ]
    if result.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in result.notes]]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    return data
