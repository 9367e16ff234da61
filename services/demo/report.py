"""A distillation job's report: a JSON summary, a Markdown page and PNG plots in the run folder.

Figures come from measurements made during the run; the cost per million tokens is an *estimate* from measured
throughput and a machine price per hour that the user sets. The quality figure says where the student's training
signal came from (`signal_share`: trained tokens per source) and how the held-out split was made; with a checker
the student is compared with the teacher at the teacher's best phrasing of the held-out prompts.
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
    recipe: str = ""
    use_case: str = ""
    checker: str = ""
    held_out: str = ""
    student_recipe: str = ""
    gate_metric: str = ""
    teacher_accuracy: float | None = None
    teacher_accuracy_best_prompt: float | None = None
    teacher_accuracy_by_variant: dict[str, float] = field(default_factory=dict)
    student_accuracy: float | None = None
    student_agreement: float | None = None
    student_kl: float | None = None
    student_top1: float | None = None
    #: A restricted output vocabulary (`StudentRecipe.output_vocab_coverage`): head rows, and the share of answer
    #: tokens they cover on the samples that chose them and on the held-out teacher answers.
    output_vocab_size: int | None = None
    output_vocab_coverage: float | None = None
    output_vocab_heldout_coverage: float | None = None
    student_step: int = 0
    promotions: int = 0
    tokens_by_source: dict[str, int] = field(default_factory=dict)
    loss_by_source: dict[str, float] = field(default_factory=dict)
    on_policy: dict[str, int] = field(default_factory=dict)
    on_policy_fraction: float = 0.0
    prompt_variants: list[str] = field(default_factory=list)
    dataset: dict[str, int] = field(default_factory=dict)
    prompts_sent: int = 0
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


def signal_share(tokens_by_source: dict[str, int]) -> dict[str, float]:
    """Fraction of trained target tokens per signal source (generated, scored_reference, scored_student,
    reference); every source is listed, 0 when unused."""
    from services.trainer.buffer import SOURCES

    total = sum(tokens_by_source.values())
    return {s: round(tokens_by_source.get(s, 0) / total, 4) if total else 0.0 for s in SOURCES}


def scores(result: DemoResult) -> tuple[str, float | None, float | None]:
    """(metric, teacher score, student score): accuracy against the teacher's best phrasing with a checker,
    agreement with the teacher's answers (the teacher's own is 1 by definition) without."""
    if result.checker:
        return "accuracy", result.teacher_accuracy_best_prompt, result.student_accuracy
    return "teacher_agreement", 1.0, result.student_agreement


def summary(result: DemoResult) -> dict[str, Any]:
    """The JSON summary `distillery distil --json` (and `demo --json`) prints last."""
    metric, teacher_score, student_score = scores(result)
    accuracy_ratio = _ratio(result.student_accuracy, result.teacher_accuracy_best_prompt)
    size_ratio = _ratio(result.teacher_params, result.student_params)
    speed_ratio = _ratio(result.student_tokens_per_s, result.teacher_tokens_per_s)
    below = [w for w in result.stream_wpm if w < READING_TARGET_WPM]
    out: dict[str, Any] = {
        "profile": result.profile,
        "recipe": result.recipe,
        "use_case": result.use_case,
        "checker": result.checker or None,
        "held_out": result.held_out,
        "teacher_model": result.teacher_model,
        "student_recipe": result.student_recipe,
        "metric": metric,
        "teacher_score": teacher_score,
        "student_score": student_score,
        "score_ratio": _ratio(student_score, teacher_score),
        "gate_metric": result.gate_metric,
        "teacher_accuracy": result.teacher_accuracy,
        "teacher_accuracy_best_prompt": result.teacher_accuracy_best_prompt,
        "teacher_accuracy_by_variant": result.teacher_accuracy_by_variant,
        "student_accuracy": result.student_accuracy,
        "accuracy_ratio": accuracy_ratio,
        "student_teacher_agreement": result.student_agreement,
        "student_kl": result.student_kl,
        "student_top1_agreement": result.student_top1,
        "output_vocab_size": result.output_vocab_size,
        "output_vocab_coverage": result.output_vocab_coverage,
        "output_vocab_heldout_coverage": result.output_vocab_heldout_coverage,
        "student_step": result.student_step,
        "signal_share": signal_share(result.tokens_by_source),
        "tokens_by_source": result.tokens_by_source,
        "loss_by_source": result.loss_by_source,
        "on_policy_fraction": result.on_policy_fraction,
        "on_policy": result.on_policy,
        "promotions": result.promotions,
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
        "prompt_variants": result.prompt_variants,
        "dataset": result.dataset,
        "prompts_sent": result.prompts_sent,
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
            "score_ratio_ge_0.968": None
            if student_score is None or not teacher_score
            else student_score / teacher_score >= GOAL_ACCURACY_RATIO,
            "accuracy_ratio_ge_0.968": None if accuracy_ratio is None else accuracy_ratio >= GOAL_ACCURACY_RATIO,
            "student_beats_teacher_best_prompt": None if accuracy_ratio is None else accuracy_ratio > 1.0,
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


def _output_vocab_lines(result: DemoResult) -> list[str]:
    """The student's restricted output vocabulary, when it has one (a row of the teacher vs student table)."""
    if result.output_vocab_size is None:
        return []
    return [f"| output vocabulary: rows (answer tokens covered: selection samples / held out) | | "
            f"{result.output_vocab_size:,} ({fmt(result.output_vocab_coverage)} / "
            f"{fmt(result.output_vocab_heldout_coverage)}) | | | |"]  # fmt: skip


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

    metric, teacher_score, student_score = scores(result)
    eval_key = "accuracy" if metric == "accuracy" else "teacher_agreement"
    paths = []
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in result.history]
    ax_loss.plot(steps, [h["loss"] for h in result.history], color="tab:blue")
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    ax_acc.plot([e["step"] for e in result.evals], [e.get(eval_key) or 0 for e in result.evals], "o-",
                label="student (held-out)")  # fmt: skip
    if teacher_score is not None:
        label = "teacher (best phrasing)" if metric == "accuracy" else "teacher"
        ax_acc.axhline(teacher_score, color="tab:red", linestyle="--", label=label)
    ax_acc.set(title=f"held-out {metric}", xlabel="step", ylabel=metric, ylim=(0, 1.05))
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
        (f"held-out {metric}", teacher_score, student_score),
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


def _signal_lines(data: dict[str, Any], result: DemoResult) -> list[str]:
    share = data["signal_share"]
    names = {"generated": "the teacher's own answers", "scored_reference": "reference answers scored by the teacher",
             "scored_student": "the student's own answers scored by the teacher (on-policy)",
             "reference": "reference answers alone (cross-entropy, no teacher)"}  # fmt: skip
    rows = [f"| {names[k]} (`{k}`) | {result.tokens_by_source.get(k, 0):,} | {v:.1%} | "
            f"{fmt(result.loss_by_source.get(k), '.3f')} |" for k, v in share.items()]  # fmt: skip
    return ["| source | trained tokens | share | recent loss |", "|---|---|---|---|", *rows]


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
    metric = data["metric"]
    variants = ", ".join(f"{k or 'as trained'} {v:.3f}" for k, v in result.teacher_accuracy_by_variant.items())
    quality = (
        f"| held-out accuracy (checker `{result.checker}`) | {fmt(result.teacher_accuracy_best_prompt)} at its best "
        f"phrasing ({variants or 'n/a'}) | {fmt(result.student_accuracy)} | {fmt(data['accuracy_ratio'])} | "
        f"≥ 0.968 (> 1: the student beats its teacher) | {fmt(goals['accuracy_ratio_ge_0.968'])} |"
        if metric == "accuracy"
        else f"| held-out agreement with the teacher's answers (no checker) | 1 (by definition) | "
        f"{fmt(result.student_agreement)} | {fmt(data['score_ratio'])} | ≥ 0.968 | "
        f"{fmt(goals['score_ratio_ge_0.968'])} |"
    )
    lines = [
        f"# distillery — `{result.use_case}`, recipe `{result.recipe}`, profile `{result.profile}`",
        "",
        f"Teacher `{result.teacher_model}` distilled into a student ({result.student_recipe}). Training prompts: "
        f"{result.train_prompts} for the teacher to answer, {result.scored_prompts} reference answers for it to "
        f"score ({result.prompts_sent} sent before the run ended); {result.eval_prompts} held-out prompts "
        f"(phrasings tried on the teacher: {', '.join(['as trained', *result.prompt_variants])}). Held-out split: "
        f"{result.held_out}. {result.teacher_samples} teacher samples. Wall time {data['wall_s']} s.",
        "",
        "## Teacher vs student",
        "",
        "| | teacher | student | ratio | goal | met |",
        "|---|---|---|---|---|---|",
        quality,
        f"| KL(teacher ‖ student) per held-out token | | {fmt(result.student_kl)} | | | |",
        f"| top-1 token agreement on held-out teacher answers | | {fmt(result.student_top1)} | | | |",
        *_output_vocab_lines(result),
        f"| parameters | {result.teacher_params:,} | {result.student_params:,} | {fmt(data['size_ratio'], '.2f')}× "
        f"fewer | ≥ 7.5× | {fmt(goals['size_ratio_ge_7.5'])} |",
        f"| tokens/s through serving ({result.speed_concurrency} streams) | {fmt(result.teacher_tokens_per_s, '.1f')}"
        f" | {fmt(result.student_tokens_per_s, '.1f')} | {fmt(data['speed_ratio'], '.2f')}× | ≥ 9.4× | "
        f"{fmt(goals['speed_ratio_ge_9.4'])} |",
        f"| concurrent streams at ≥ 238 wpm (p50) | {fmt(result.teacher_streams_at_target)} | "
        f"{fmt(result.student_streams_at_target)} | | | |",
        "",
        "## Where the student's signal came from",
        "",
        *_signal_lines(data, result),
        "",
        f"On-policy fraction of each batch: {result.on_policy_fraction:g}; student completions sent to be scored "
        f"{result.on_policy.get('requested', 0)}, scored ones received {result.on_policy.get('received', 0)}, "
        f"stale {result.on_policy.get('stale', 0)} (dropped {result.on_policy.get('stale_dropped', 0)}).",
        "",
        "## Serving during training",
        "",
        f"{result.streams} client streams were served while the trainer promoted students; {result.promotions} "
        f"promotion{'' if result.promotions == 1 else 's'}, {result.swaps} hot-swap"
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
        "| step | student accuracy | teacher accuracy (best phrasing) | agreement with teacher | KL | "
        "top-1 agreement | perplexity |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {e['step']} | {fmt(e.get('accuracy'))} | {fmt(e.get('teacher_accuracy_best_prompt'))} | "
            f"{fmt(e.get('teacher_agreement'))} | {fmt(e.get('kl'))} | {fmt(e.get('top1_agreement'))} | "
            f"{fmt(e.get('perplexity'), '.2f')} |"
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
