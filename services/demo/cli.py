"""`distillery demo`: the whole pipeline on embedded defaults, with a report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.table import Table


def demo(
    profile: Annotated[str, typer.Option(help="smoke (tiny models, ≈3 min), default (≤ 20 min) or full.")] = "default",
    json_output: Annotated[bool, typer.Option("--json", help="Print the JSON summary last on stdout.")] = False,
    run_dir: Annotated[Path | None, typer.Option(help="Report folder (default: <home>/runs/<time>-<profile>).")] = None,
    machine_price_per_hour: Annotated[
        float, typer.Option(help="USD per hour of this machine, for the cost-per-million-tokens estimate.")
    ] = 0.10,
) -> None:
    """Distils the default teacher end to end: broker, teacher, trainer, serving, client load, hot-swaps, report."""
    from services.common.models import offline
    from services.common.settings import distillery_home
    from services.demo.pipeline import Demo, DemoFailed, ServiceFailed, install_sigterm_as_interrupt
    from services.demo.profiles import get_profile

    offline()
    console = Console(stderr=True)
    try:
        chosen = get_profile(profile)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    home = distillery_home()
    folder = (run_dir or home / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{chosen.name}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    console.rule(f"distillery demo — profile {chosen.name}")
    console.print(f"run folder: {folder}")
    install_sigterm_as_interrupt()
    try:
        summary = Demo(chosen, home, folder, console, machine_price_per_hour).run()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process the demo started has been stopped[/yellow]")
        raise typer.Exit(130) from None
    except (DemoFailed, ServiceFailed) as exc:
        console.print(f"[red]demo failed: {exc}[/red]")
        raise typer.Exit(1) from None
    except grpc.RpcError as exc:
        console.print(f"[red]demo failed: a service answered {exc.code().name}: {exc.details()}[/red]")
        console.print(f"logs: {folder / 'logs'}")
        raise typer.Exit(1) from None
    _print_summary(console, summary, folder)
    if json_output:
        print(json.dumps(summary))


def _print_summary(console: Console, s: dict, folder: Path) -> None:
    from services.demo.report import fmt

    table = Table(title=f"teacher vs student ({s['profile']} profile, {s['wall_s']} s)")
    for column in ("", "teacher", "student", "ratio", "goal met"):
        table.add_column(column)
    goals = s["goals"]
    table.add_row("held-out accuracy", fmt(s["teacher_accuracy"]), fmt(s["student_accuracy"]),
                  fmt(s["accuracy_ratio"]), fmt(goals["accuracy_ratio_ge_0.968"]))  # fmt: skip
    table.add_row("parameters", f"{s['teacher_params']:,}", f"{s['student_params']:,}",
                  f"{fmt(s['size_ratio'], '.2f')}× fewer", fmt(goals["size_ratio_ge_7.5"]))  # fmt: skip
    table.add_row("tokens/s (serving)", fmt(s["teacher_tokens_per_s"], ".1f"), fmt(s["student_tokens_per_s"], ".1f"),
                  f"{fmt(s['speed_ratio'], '.2f')}×", fmt(goals["speed_ratio_ge_9.4"]))  # fmt: skip
    table.add_row("streams ≥ 238 wpm", fmt(s["teacher_streams_at_target"]), fmt(s["student_streams_at_target"]),
                  "", "")  # fmt: skip
    console.print(table)
    console.print(
        f"served {s['streams']} streams during training: {s['swaps']} hot-swaps, {s['failed_requests']} failed, "
        f"{s['streams_below_target']} below 238 wpm (p50 {fmt(s['stream_wpm_p50'], '.0f')} wpm)"
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
