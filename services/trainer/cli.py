"""`distillery trainer serve | run | status | watch | stop | checkpoints` and `distillery bench trainer`."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    help="The trainer service: distillation runs, evaluation, checkpoints, promotion.", no_args_is_help=True
)
console = Console(stderr=True)
Address = Annotated[str, typer.Option(help="Trainer gRPC address.", envvar="DISTILLERY_TRAINER_ADDRESS")]
DEFAULT_ADDRESS = "127.0.0.1:50052"


@app.command()
def serve(
    teacher_model: Annotated[str | None, typer.Option(help="Prepared model name or a Hugging Face folder.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (0.0.0.0 in containers).")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (default 50052; 0 picks one).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="/metrics port (default 9102; 0 picks one).")] = None,
    torch_threads: Annotated[int | None, typer.Option(help="torch threads; 0 = all cores.")] = None,
) -> None:
    """Runs the trainer gRPC service; resumes the unfinished run (settings: DISTILLERY_TRAINER_*)."""
    from services.trainer.main import run
    from services.trainer.settings import TrainerSettings

    given: dict[str, Any] = {
        "teacher_model": teacher_model,
        "host": host,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "torch_threads": torch_threads,
    }
    settings = TrainerSettings(**{k: v for k, v in given.items() if v is not None})
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        console.print(f"[red]trainer stopped: {exc}[/red]")
        raise typer.Exit(1) from None


def _channel(address: str) -> Any:
    """A channel secured by `DISTILLERY_TLS_*` / `DISTILLERY_AUTH_*`; unusable settings end the command plainly."""
    from services.common import channels
    from services.common.security import SecurityError

    try:
        return channels.channel(address)
    except SecurityError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _call(address: str, method: str, request: Any) -> Any:
    import grpc

    from services.common import pb

    with _channel(address) as channel:
        stub = pb.trainer_grpc.TrainerServiceStub(channel)
        try:
            return getattr(stub, method)(request, timeout=120)
        except grpc.RpcError as exc:
            console.print(f"[red]{method}: {exc.code().name}: {exc.details()}[/red]")
            raise typer.Exit(1) from None


def _print(message: Any) -> None:
    from google.protobuf import json_format

    print(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2))


@app.command("run")
def start_run(
    address: Address = DEFAULT_ADDRESS,
    run_id: Annotated[str, typer.Option(help="Run id (empty: generated).")] = "",
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (0: until stopped).")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between evaluations/checkpoints.")] = None,
    spec_json: Annotated[str | None, typer.Option(help="A RunSpec as JSON (other options override it).")] = None,
    queue: Annotated[bool, typer.Option(help="Queue behind an active run instead of failing.")] = False,
) -> None:
    """Starts a distillation run with the default recipe (and any overrides); prints the run."""
    from google.protobuf import json_format

    from services.common import pb

    spec = json_format.Parse(spec_json, pb.trainer.RunSpec()) if spec_json else pb.trainer.RunSpec()
    if run_id:
        spec.run_id = run_id
    for name, value in (
        ("max_steps", max_steps),
        ("batch_size", batch_size),
        ("learning_rate", learning_rate),
        ("eval_every_steps", eval_every),
    ):
        if value is not None:
            setattr(spec.schedule, name, value)
    spec.queue = queue
    _print(_call(address, "StartRun", pb.trainer.StartRunRequest(spec=spec)).run)


@app.command()
def status(run_id: Annotated[str, typer.Argument()], address: Address = DEFAULT_ADDRESS) -> None:
    """Prints a run: spec, progress, last evaluation."""
    from services.common import pb

    _print(_call(address, "GetRun", pb.trainer.GetRunRequest(run_id=run_id)).run)


@app.command()
def stop(
    run_id: Annotated[str, typer.Argument()],
    address: Address = DEFAULT_ADDRESS,
    evaluate: Annotated[
        bool, typer.Option(help="Evaluate the final checkpoint first, so the gate can promote it.")
    ] = False,
) -> None:
    """Stops a run after a final checkpoint."""
    from services.common import pb

    _print(_call(address, "StopRun", pb.trainer.StopRunRequest(run_id=run_id, evaluate=evaluate)).run)


@app.command()
def checkpoints(
    run_id: Annotated[str, typer.Argument()] = "",
    address: Address = DEFAULT_ADDRESS,
    promoted_only: Annotated[bool, typer.Option()] = False,
) -> None:
    """Lists checkpoints (of one run, or all)."""
    from services.common import pb

    request = pb.trainer.ListCheckpointsRequest(run_id=run_id, promoted_only=promoted_only)
    _print(_call(address, "ListCheckpoints", request))


@app.command()
def watch(run_id: Annotated[str, typer.Argument()], address: Address = DEFAULT_ADDRESS) -> None:
    """Streams a run's progress as JSON lines until it ends."""
    import grpc
    from google.protobuf import json_format

    from services.common import pb

    with _channel(address) as channel:
        stub = pb.trainer_grpc.TrainerServiceStub(channel)
        try:
            for response in stub.WatchRun(pb.trainer.WatchRunRequest(run_id=run_id)):
                line = json_format.MessageToDict(response.progress, preserving_proto_field_name=True)
                print(json.dumps(line), flush=True)
        except grpc.RpcError as exc:
            console.print(f"[red]WatchRun: {exc.code().name}: {exc.details()}[/red]")
            raise typer.Exit(1) from None


def bench(
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    prompts: Annotated[int, typer.Option(help="Prompts the teacher answers (top-20 logprobs).")] = 128,
    max_tokens: Annotated[int, typer.Option(help="Longest teacher completion.")] = 64,
    steps: Annotated[int, typer.Option(help="Optimizer steps timed for each trainer.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Sequences per step, both trainers.")] = 16,
    trl: Annotated[bool, typer.Option("--trl/--no-trl", help="Also time TRL's GKDTrainer.")] = True,
    compile_student: Annotated[
        bool, typer.Option("--compile/--no-compile", help="torch.compile this trainer's student decoder.")
    ] = False,
) -> None:
    """`distillery bench trainer`: teacher vs trainer tokens/s in one run, and this trainer vs TRL's GKDTrainer."""
    from services.bench.trainer import BenchConfig, run_bench
    from services.common.process import stdout_to_stderr

    config = BenchConfig(
        prompts=prompts, max_tokens=max_tokens, steps=steps, batch_size=batch_size, trl=trl, compile=compile_student
    )
    with stdout_to_stderr():
        result = run_bench(config, log=lambda line: console.print(line))
    if json_output:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            console.print(f"{key}: {value}")
    sys.stdout.flush()
