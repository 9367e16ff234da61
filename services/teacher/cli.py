"""`distillery teacher …` and `distillery prompts …`."""

from __future__ import annotations

import typer

from services.common.stub import not_implemented

app = typer.Typer(help="The teacher service (vLLM) and its Kafka pipeline worker.", no_args_is_help=True)
prompts_app = typer.Typer(help="Feed prompts into distillery.prompts.v1.", no_args_is_help=True)


@app.command()
def serve() -> None:
    """Runs the teacher gRPC service and its prompt → sample pipeline worker."""
    not_implemented("teacher serve", 3)


@prompts_app.command()
def publish() -> None:
    """Publishes prompts from a JSONL file to distillery.prompts.v1."""
    not_implemented("prompts publish", 3)


def bench(json_output: bool = False) -> None:
    """`distillery bench teacher`."""
    not_implemented("bench teacher", 3)
