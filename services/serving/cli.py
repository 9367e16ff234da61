"""`distillery serving serve`, `distillery loadtest`, `distillery bench serving` and `distillery bench swap`."""

from __future__ import annotations

import asyncio

import typer

app = typer.Typer(
    help="The serving service: streams student answers and hot-swaps promoted ones.", no_args_is_help=True
)


@app.command()
def serve() -> None:
    """Runs the serving gRPC service with its checkpoint watcher (settings from DISTILLERY_SERVING_* env)."""
    from services.serving.main import run
    from services.serving.settings import ServingSettings

    asyncio.run(run(ServingSettings()))


def loadtest() -> None:
    """Concurrent Generate streams against a serving address for a bounded time."""
    from services.common.stub import not_implemented

    not_implemented("loadtest", 5)


def bench(json_output: bool = False) -> None:
    """`distillery bench serving`."""
    from services.common.stub import not_implemented

    not_implemented("bench serving", 5)


def bench_swap(json_output: bool = False) -> None:
    """`distillery bench swap`."""
    from services.common.stub import not_implemented

    not_implemented("bench swap", 5)
