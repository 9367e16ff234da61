"""`distillery tasks list|export`: the built-in use cases, written out as JSONL prompts for `distillery distil`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Built-in use cases: list them, export one as a JSONL prompts file.", no_args_is_help=True)
console = Console(stderr=True)


@app.command("list")
def list_tasks(json_output: Annotated[bool, typer.Option("--json", help="One JSON object per task.")] = False) -> None:
    """The built-in use cases, each with its checker and how its held-out split is made."""
    from services.tasks.builtin import TASKS

    if json_output:
        for t in TASKS.values():
            print(json.dumps({"name": t.name, "description": t.description, "checker": t.checker,
                              "held_out": t.held_out}))  # fmt: skip
        return
    table = Table()
    for column in ("name", "what", "checker", "held-out split"):
        table.add_column(column)
    for t in TASKS.values():
        table.add_row(t.name, t.description, t.checker, t.held_out)
    Console().print(table)


@app.command("export")
def export(
    name: Annotated[str, typer.Argument(help="A built-in use case (distillery tasks list).")],
    out: Annotated[Path, typer.Option(help="The JSONL file to write.")],
    n: Annotated[int, typer.Option(help="Prompts in all (training + held out).", min=2)] = 1000,
    eval_fraction: Annotated[float, typer.Option(help="Share of them held out.", min=0.0, max=0.9)] = 0.1,
    seed: Annotated[int, typer.Option(help="Generator seed: the same seed writes the same file.")] = 0,
) -> None:
    """Writes `n` prompts with references and splits; prints the checker to distil them with."""
    from services.tasks.builtin import get_builtin
    from services.tasks.dataset import counts, write_examples

    try:
        task = get_builtin(name)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    held_out = max(1, round(n * eval_fraction))
    examples = task.generate(n - held_out, held_out, seed)
    write_examples(out, examples)
    split = counts(examples)
    console.print(f"wrote {len(examples)} prompts to {out}: {split['train']} training, {split['eval']} held out "
                  f"({task.held_out})")  # fmt: skip
    console.print(f"distil them with: distillery distil --prompts {out} --checker '{task.checker}'")
    print(json.dumps({"path": str(out), "checker": task.checker, **split}))
