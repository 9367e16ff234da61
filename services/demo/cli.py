"""`distillery distil` (a user's own teacher and prompts) and `distillery demo` (the same pipeline on a built-in use
case): broker, teacher, trainer, serving, client load, hot-swaps, report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, NoReturn

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

PROFILE_HELP = "smoke (tiny models, ≈3 min), default (≤ 20 min on 2 cores) or full (longer training)."
RECIPE_HELP = "kd: teacher signal only (its answers, on-policy scores); best: also verified answers and references."
ON_POLICY_HELP = "Share of each batch from the student's own answers scored by the teacher (0: off-policy)."
PROMPTS_HELP = 'JSONL prompts, one {"id", "messages" | "prompt", "reference"?, "split"?} per line.'
CHECKER_HELP = "exact | numeric | regex:PATTERN | choice | python:MODULE:FUNCTION; none: judged by agreement."
TEACHER_HELP = "A Hugging Face model folder, 'default' (SmolLM2-135M-Instruct) or 'tiny'."
STUDENT_HELP = """StudentRecipe as JSON or a JSON file, e.g. '{"pruned": {"num_layers": 6}}'."""

ProfileOption = Annotated[str, typer.Option(help=PROFILE_HELP)]
RecipeOption = Annotated[str, typer.Option(help=RECIPE_HELP)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the JSON summary last on stdout.")]
RunDirOption = Annotated[Path | None, typer.Option(help="Report folder (default: <home>/runs/<time>-<name>).")]
PriceOption = Annotated[float, typer.Option(help="USD per hour of this machine, for the cost estimate.")]
OnPolicyOption = Annotated[float | None, typer.Option(help=ON_POLICY_HELP)]


def distil(
    prompts: Annotated[Path, typer.Option(help=PROMPTS_HELP)],
    teacher: Annotated[str | None, typer.Option(help=TEACHER_HELP)] = None,
    eval_file: Annotated[Path | None, typer.Option("--eval", help="Held-out prompts (the rest is training).")] = None,
    checker: Annotated[str, typer.Option(help=CHECKER_HELP)] = "",
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
    profile: ProfileOption = "default",
    recipe: RecipeOption = "best",
    eval_fraction: Annotated[
        float, typer.Option(help="Share of lines without a split held out (a seeded hash of each id).")
    ] = 0.1,
    split_seed: Annotated[int, typer.Option(help="Seed of that split.")] = 0,
    on_policy_fraction: OnPolicyOption = None,
    gate_metric: Annotated[
        str, typer.Option(help="accuracy | teacher_agreement | top1_agreement | kl (default: by the checker).")
    ] = "",
    gate_min_score: Annotated[float | None, typer.Option(help="The gate metric's threshold.")] = None,
    json_output: JsonOption = False,
    run_dir: RunDirOption = None,
    machine_price_per_hour: PriceOption = 0.10,
) -> None:
    """Distils a teacher on your own prompts: checks them, then runs the whole pipeline and writes a report."""
    from services.demo.job import JobError, load_job
    from services.demo.profiles import get_profile, get_recipe

    console = Console(stderr=True)
    try:
        job = load_job(
            prompts, profile=get_profile(profile), recipe=get_recipe(recipe), teacher=teacher, eval_file=eval_file,
            checker=checker, student=student, eval_fraction=eval_fraction, split_seed=split_seed,
            on_policy_fraction=on_policy_fraction, gate_metric=gate_metric, gate_min_score=gate_min_score,
        )  # fmt: skip
    except (JobError, ValueError) as exc:
        _refuse(console, exc)
    _run(job, console, json_output, run_dir, machine_price_per_hour)


def demo(
    profile: ProfileOption = "default",
    recipe: RecipeOption = "best",
    on_policy_fraction: OnPolicyOption = None,
    json_output: JsonOption = False,
    run_dir: RunDirOption = None,
    machine_price_per_hour: PriceOption = 0.10,
    student: Annotated[str | None, typer.Option(help=STUDENT_HELP)] = None,
) -> None:
    """`distillery distil` on the default built-in use case (`distillery tasks list`), exported into the run folder."""
    from services.demo.job import JobError, load_job
    from services.demo.profiles import get_profile, get_recipe
    from services.tasks.builtin import DEFAULT_TASK, get_builtin
    from services.tasks.dataset import write_examples

    console = Console(stderr=True)
    try:
        chosen, how = get_profile(profile), get_recipe(recipe)
    except ValueError as exc:
        _refuse(console, exc)
    task = get_builtin(DEFAULT_TASK)
    folder = _folder(run_dir, f"{chosen.name}-{how.name}")
    train = max(chosen.generate_prompts, chosen.best_generated + chosen.score_prompts)
    path = folder / f"{task.name}.jsonl"
    write_examples(path, task.generate(train, chosen.eval_prompts, chosen.seed))
    try:
        job = load_job(path, profile=chosen, recipe=how, checker=task.checker, held_out=task.held_out, name=task.name,
                       on_policy_fraction=on_policy_fraction, student=student)  # fmt: skip
    except (JobError, ValueError) as exc:
        _refuse(console, exc)
    _run(job, console, json_output, folder, machine_price_per_hour)


def _refuse(console: Console, exc: Exception) -> NoReturn:
    """What the user must fix, in full (no wrapping, no markup from the message), and exit code 2."""
    console.print(f"[red]{escape(str(exc))}[/red]", soft_wrap=True)
    raise typer.Exit(2) from None


def _folder(run_dir: Path | None, name: str) -> Path:
    from services.common.settings import distillery_home

    folder = (run_dir or distillery_home() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _run(job: object, console: Console, json_output: bool, run_dir: Path | None, price: float) -> None:
    from services.common.models import offline
    from services.common.settings import distillery_home
    from services.demo.job import Job
    from services.demo.pipeline import DemoFailed, Pipeline, ServiceFailed, install_sigterm_as_interrupt
    from services.tasks.dataset import counts

    assert isinstance(job, Job)
    offline()
    folder = _folder(run_dir, f"{job.name}-{job.profile.name}-{job.recipe.name}")
    console.rule(f"distillery — {job.name}, recipe {job.recipe.name}, profile {job.profile.name}")
    split = counts(job.examples)
    checker = job.checker or "none (judged by agreement with the teacher)"
    console.print(f"prompts: {split['train']} training, {split['eval']} held out ({job.held_out})")
    console.print(f"checker: {checker}; teacher: {job.teacher}")
    console.print(f"run folder: {folder}")
    install_sigterm_as_interrupt()
    try:
        summary = Pipeline(job, distillery_home(), folder, console, price).run()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process the pipeline started has been stopped[/yellow]")
        raise typer.Exit(130) from None
    except (DemoFailed, ServiceFailed) as exc:
        console.print(f"[red]failed: {exc}[/red]")
        raise typer.Exit(1) from None
    except grpc.RpcError as exc:
        console.print(f"[red]failed: a service answered {exc.code().name}: {exc.details()}[/red]")
        console.print(f"logs: {folder / 'logs'}")
        raise typer.Exit(1) from None
    _print_summary(console, summary, folder)
    if json_output:
        print(json.dumps(summary))


def _print_summary(console: Console, s: dict, folder: Path) -> None:
    from services.demo.report import fmt

    table = Table(title=f"teacher vs student ({s['use_case']}, recipe {s['recipe']}, {s['wall_s']} s)")
    for column in ("", "teacher", "student", "ratio", "goal met"):
        table.add_column(column)
    goals = s["goals"]
    label = "held-out accuracy (teacher at its best phrasing)" if s["metric"] == "accuracy" else (
        "held-out agreement with the teacher")  # fmt: skip
    table.add_row(label, fmt(s["teacher_score"]), fmt(s["student_score"]), fmt(s["score_ratio"]),
                  fmt(goals["score_ratio_ge_0.968"]))  # fmt: skip
    table.add_row("parameters", f"{s['teacher_params']:,}", f"{s['student_params']:,}",
                  f"{fmt(s['size_ratio'], '.2f')}× fewer", fmt(goals["size_ratio_ge_7.5"]))  # fmt: skip
    table.add_row("tokens/s (serving)", fmt(s["teacher_tokens_per_s"], ".1f"), fmt(s["student_tokens_per_s"], ".1f"),
                  f"{fmt(s['speed_ratio'], '.2f')}×", fmt(goals["speed_ratio_ge_9.4"]))  # fmt: skip
    table.add_row("streams ≥ 238 wpm", fmt(s["teacher_streams_at_target"]), fmt(s["student_streams_at_target"]),
                  "", "")  # fmt: skip
    console.print(table)
    share = ", ".join(f"{k} {v:.0%}" for k, v in s["signal_share"].items() if v)
    console.print(f"signal: {share or 'n/a'}; held-out split: {s['held_out']}")
    console.print(
        f"served {s['streams']} streams during training: {s['promotions']} promotions, {s['swaps']} hot-swaps, "
        f"{s['failed_requests']} failed, {s['streams_below_target']} below 238 wpm "
        f"(p50 {fmt(s['stream_wpm_p50'], '.0f')} wpm)"
    )
    cost = s["cost_estimate"]
    console.print(
        f"cost estimate per million tokens at ${cost['machine_price_per_hour_usd']}/h: teacher "
        f"${fmt(cost['teacher_usd_per_million_tokens'], '.4f')}, student "
        f"${fmt(cost['student_usd_per_million_tokens'], '.4f')}"
    )
    for note in s["notes"]:
        console.print(f"note: {note}")
    console.print(f"report: {folder / 'report.md'}")
