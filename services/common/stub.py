"""Commands whose issue has not landed yet say so plainly and exit 2; they never pretend."""

from __future__ import annotations

import typer


def not_implemented(what: str, issue: int) -> None:
    typer.echo(f"`distillery {what}` is not implemented yet (tracked in issue #{issue}).", err=True)
    raise typer.Exit(2)
