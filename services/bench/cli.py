"""`distillery bench scale`, `onpolicy` and `rescore`: the commands; the measurements live in
services/bench/scale*.py, services/bench/onpolicy*.py and services/bench/rescore.py."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def scale(
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    parts: Annotated[
        str, typer.Option(help="Comma-separated parts to run, in order: teacher, serving, trainer.")
    ] = "teacher,serving,trainer",
    prompts: Annotated[int, typer.Option(help="Prompts fed to 1 and then 2 teacher workers.")] = 128,
    max_tokens: Annotated[int, typer.Option(help="Longest completion, teacher and serving.")] = 64,
    serving_s: Annotated[float, typer.Option(help="Measured load per serving configuration, seconds.")] = 30.0,
    trainer_steps: Annotated[int, typer.Option(help="Optimizer steps timed for 1 and 2 trainer ranks.")] = 20,
    workdir: Annotated[
        Path | None, typer.Option(help="Where brokers, models and logs go (default: a temporary folder).")
    ] = None,
) -> None:
    """1 vs 2 teacher workers (kill -9 of one: takeover, prompts lost), serving replicas (round robin, failed
    requests) and trainer ranks (gloo: losses equal, all-reduce overhead), side by side in one run."""
    from services.bench.scale import PARTS, run_scale
    from services.common.process import stdout_to_stderr

    chosen = tuple(p.strip() for p in parts.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PARTS]
    if not chosen or unknown:
        raise typer.BadParameter(f"choose from {', '.join(PARTS)}; got {parts!r}", param_hint="--parts")
    with stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="distillery-scale-") as tmp:
        result = run_scale(
            chosen,
            workdir=workdir or Path(tmp),
            teacher_prompts=prompts,
            max_tokens=max_tokens,
            serving_duration_s=serving_s,
            trainer_steps=trainer_steps,
            progress=lambda line: console.print(line),
        )
    if json_output:
        print(json.dumps(result))
    else:
        console.print_json(json.dumps(result))
    sys.stdout.flush()


def onpolicy(
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    profile: Annotated[str, typer.Option(help="Demo profile: default (packaged teacher) or smoke (tiny models).")] = (
        "default"
    ),
    wall_s: Annotated[float, typer.Option(help="Training wall time of each side, seconds.")] = 600.0,
    on_policy_fraction: Annotated[
        float | None, typer.Option(help="Our share of each batch from scored student completions (default: kd's).")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder (default: <home>/runs/<time>-bench-onpolicy).")
    ] = None,
) -> None:
    """Our on-policy loop (`distillery demo --recipe kd`) beside TRL's DistillationTrainer: same initial student,
    teacher, training prompts and held-out set, equal training wall time; held-out scores and tokens/s."""
    from services.bench.onpolicy import OnPolicyBenchConfig, run_bench
    from services.common.process import stdout_to_stderr
    from services.common.settings import distillery_home
    from services.demo.job import JobError
    from services.demo.pipeline import DemoFailed, ServiceFailed

    if wall_s <= 0:
        raise typer.BadParameter(f"must be > 0, got {wall_s}", param_hint="--wall-s")
    if on_policy_fraction is not None and not 0.0 <= on_policy_fraction <= 1.0:
        raise typer.BadParameter(f"must be in [0, 1], got {on_policy_fraction}", param_hint="--on-policy-fraction")
    if profile not in ("default", "smoke"):
        raise typer.BadParameter(f"choose default or smoke; got {profile!r}", param_hint="--profile")
    folder = (run_dir or distillery_home() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-bench-onpolicy").resolve()
    config = OnPolicyBenchConfig(profile=profile, wall_s=wall_s, on_policy_fraction=on_policy_fraction)
    try:
        with stdout_to_stderr():
            result = run_bench(config, folder, console, log=lambda line: console.print(line))
    except (JobError, DemoFailed, ServiceFailed) as exc:
        console.print(f"[red]failed: {exc}[/red] (logs: {folder / 'logs'})")
        raise typer.Exit(1) from None
    (folder / "bench-onpolicy.json").write_text(json.dumps(result, indent=2))
    if json_output:
        print(json.dumps(result))
    else:
        console.print_json(json.dumps(result))
    sys.stdout.flush()


def rescore(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (with registry/checkpoints) or registries.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    problems: Annotated[int, typer.Option(help="Held-out problems each checkpoint answers.")] = 1200,
    task: Annotated[str, typer.Option(help="Built-in use case whose held-out split is drawn.")] = "math_word_problems",
    seed: Annotated[int, typer.Option(help="Seed of the draw (the same draw for every run).")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer (the demo's evaluation: 32).")] = 32,
) -> None:
    """Every checkpoint of each run scored again on one larger held-out draw (the demo's 200 problems are ±5–6
    points): accuracy per checkpoint, best, last and mean, runs side by side."""
    from services.bench.rescore import RescoreError
    from services.bench.rescore import rescore as run_rescore
    from services.common.process import stdout_to_stderr

    if problems < 1:
        raise typer.BadParameter(f"must be at least 1, got {problems}", param_hint="--problems")
    try:
        with stdout_to_stderr():
            result = run_rescore(runs, task, problems, seed, max_new_tokens, log=lambda line: console.print(line))
    except RescoreError as exc:
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    if json_output:
        print(json.dumps(result))
    else:
        console.print_json(json.dumps(result))
    sys.stdout.flush()
