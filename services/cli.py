"""The `distillery` command: one group of subcommands per service, plus demo, bench and loadtest.

Heavy imports (torch, vLLM) happen inside commands, so `distillery --help` stays fast.
"""

from __future__ import annotations

import typer

from services.bench import cli as bench_cli
from services.common.cli import broker_app, models_app
from services.demo import cli as demo_cli
from services.serving import cli as serving_cli
from services.tasks import cli as tasks_cli
from services.teacher import cli as teacher_cli
from services.trainer import cli as trainer_cli

app = typer.Typer(
    help="Distil a large LLM teacher into a small, fast student; serve it and keep improving it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks: ratios measured side by side in one run.", no_args_is_help=True)


@bench_app.callback()
def _bench_stops_cleanly() -> None:
    """SIGTERM (what `timeout` sends) stops a benchmark like Ctrl-C: its `finally` blocks stop what it started."""
    from services.common.process import install_sigterm_as_interrupt

    install_sigterm_as_interrupt()


app.add_typer(broker_app, name="broker")
app.add_typer(models_app, name="models")
app.add_typer(teacher_cli.prompts_app, name="prompts")
app.add_typer(teacher_cli.app, name="teacher")
app.add_typer(trainer_cli.app, name="trainer")
app.add_typer(serving_cli.app, name="serving")
app.add_typer(bench_app, name="bench")
app.add_typer(tasks_cli.app, name="tasks")
app.command("distil")(demo_cli.distil)
app.command("demo")(demo_cli.demo)
app.command("loadtest")(serving_cli.loadtest)
bench_app.command("teacher")(teacher_cli.bench)
bench_app.command("trainer")(trainer_cli.bench)
bench_app.command("serving")(serving_cli.bench)
bench_app.command("swap")(serving_cli.bench_swap)
bench_app.command("scale")(bench_cli.scale)
bench_app.command("onpolicy")(bench_cli.onpolicy)
bench_app.command("rescore")(bench_cli.rescore)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
