"""`distillery trainer …`."""

from __future__ import annotations

import typer

from services.common.stub import not_implemented

app = typer.Typer(
    help="The trainer service: distillation runs, evaluation, checkpoints, promotion.", no_args_is_help=True
)


@app.command()
def serve() -> None:
    """Runs the trainer gRPC service."""
    not_implemented("trainer serve", 4)


def bench(json_output: bool = False) -> None:
    """`distillery bench trainer`."""
    not_implemented("bench trainer", 4)
