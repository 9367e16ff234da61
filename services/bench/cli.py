"""`distillery bench scale`: the command; the measurements live in services/bench/scale*.py."""

from __future__ import annotations

import json
import sys
import tempfile
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
