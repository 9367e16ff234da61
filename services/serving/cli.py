"""`distillery serving …` and `distillery loadtest`."""

from __future__ import annotations

import typer

from services.common.stub import not_implemented

app = typer.Typer(
    help="The serving service: streams student answers and hot-swaps promoted ones.", no_args_is_help=True
)


@app.command()
def serve() -> None:
    """Runs the serving gRPC service with its checkpoint watcher."""
    not_implemented("serving serve", 5)


def loadtest() -> None:
    """Concurrent Generate streams against a serving address for a bounded time."""
    not_implemented("loadtest", 5)


def bench(json_output: bool = False) -> None:
    """`distillery bench serving`."""
    not_implemented("bench serving", 5)


def bench_swap(json_output: bool = False) -> None:
    """`distillery bench swap`."""
    not_implemented("bench swap", 5)
