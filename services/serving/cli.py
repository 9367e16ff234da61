"""`distillery serving serve`, `distillery loadtest`, `distillery bench serving` and `distillery bench swap`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

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


def loadtest(
    address: Annotated[str, typer.Option(help="Serving gRPC address.")] = "127.0.0.1:50053",
    concurrency: Annotated[int, typer.Option(min=1, help="Streams open at once.")] = 8,
    duration: Annotated[float, typer.Option(min=0, help="Seconds to run (0: until --streams are done).")] = 30.0,
    streams: Annotated[int, typer.Option(min=0, help="Streams in all (0: until --duration ends).")] = 0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens per stream.")] = 128,
    temperature: Annotated[float, typer.Option(min=0)] = 1.0,
    stop_at_eos: Annotated[
        bool, typer.Option(help="Let streams end at end-of-sequence (default: exactly max_tokens).")
    ] = False,
    swap: Annotated[
        list[str] | None, typer.Option(help="Checkpoint URI to LoadModel during the run (repeatable).")
    ] = None,
    swap_interval: Annotated[float, typer.Option(min=0, help="Seconds between swaps.")] = 10.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Concurrent Generate streams against a serving address: words per minute, TTFT, ITL, failures, tokens/s."""
    from services.serving.loadtest import LoadtestConfig, run_loadtest

    if duration <= 0 and streams <= 0:
        raise typer.BadParameter("give --duration and/or --streams")
    config = LoadtestConfig(
        address=address,
        concurrency=concurrency,
        duration_s=duration if duration > 0 else None,
        max_streams=streams or None,
        max_tokens=max_tokens,
        ignore_eos=not stop_at_eos,
        temperature=temperature,
        swap_uris=swap or [],
        swap_interval_s=swap_interval,
    )
    summary = asyncio.run(run_loadtest(config)).summary()
    if json_output:
        typer.echo(json.dumps(summary))
    else:
        for key, value in summary.items():
            typer.echo(f"{key:>24}: {value}")
    if summary["failed"]:
        raise typer.Exit(1)


def bench(
    json_output: Annotated[bool, typer.Option("--json", help="Print only the JSON result.")] = False,
    probe_s: Annotated[float, typer.Option(min=1, help="Seconds of load per probed concurrency.")] = 15.0,
    equal_probe_s: Annotated[
        float,
        typer.Option(
            min=1,
            help="Seconds of the probe at the equal concurrency (and of each engine driven directly): tokens/s are "
            "its steady state, after the first wave of streams has ended.",
        ),
    ] = 60.0,
    budget_s: Annotated[float, typer.Option(min=10, help="Time for both capacity searches.")] = 1500.0,
    temperature: Annotated[float, typer.Option(min=0, help="Sampling temperature of every stream.")] = 0.0,
    max_tokens: Annotated[int, typer.Option(min=8, help="Tokens per stream.")] = 128,
    student: Annotated[
        Path | None,
        typer.Option(
            exists=True, file_okay=False, help="Student model folder (default: the default student, untrained)."
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(exists=True, file_okay=False, help="Teacher model folder (default: the packaged teacher)."),
    ] = None,
    stop_at_eos: Annotated[
        bool,
        typer.Option(help="Capacity probes end each stream with the model's answer (for trained models)."),
    ] = False,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Instead: tokens/s of the student over plain text vs over mTLS with a token, at --streams.",
        ),
    ] = False,
    streams: Annotated[int, typer.Option(min=1, help="With --tls: concurrent streams.")] = 64,
    rounds: Annotated[int, typer.Option(min=1, help="With --tls: alternating plain/TLS probe pairs.")] = 3,
    enforce_eager: Annotated[bool, typer.Option(help="Skip torch.compile in the engines (faster start).")] = False,
    client_processes: Annotated[
        int, typer.Option(min=1, max=64, help="Processes the load generator runs in (never the benchmark's own).")
    ] = 1,
    stream_interval_ms: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=1000,
            help="The service's stream interval (tokens within it go out as one message); default: its own.",
        ),
    ] = None,
    student_head_coverage: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="The default student's LM head restricted to the use case's tokens at this coverage; 0: the full "
            "vocabulary; default: the default student recipe's (0.99).",
        ),
    ] = None,
    raw_engine: Annotated[
        bool, typer.Option(help="Also drive each engine directly at the equal concurrency (serving_vs_raw_vllm).")
    ] = True,
) -> None:
    """`distillery bench serving`: streams at the 238 wpm reading target, student vs teacher, through the service.
    With --tls: what TLS costs in tokens/s."""
    from services.bench.serving import check_model_folders, default_config, run_serving_bench
    from services.common.models import ModelError

    _bench_logging(json_output)
    config = default_config(
        probe_s=probe_s,
        equal_probe_s=equal_probe_s,
        budget_s=budget_s,
        temperature=temperature,
        max_tokens=max_tokens,
        student_dir=student.resolve() if student else None,
        teacher_dir=teacher.resolve() if teacher else None,
        capacity_stop_at_eos=stop_at_eos,
        enforce_eager=enforce_eager,
        client_processes=client_processes,
        stream_interval_ms=stream_interval_ms,
        raw_engine=raw_engine,
        student_head_coverage=student_head_coverage,
    )
    try:
        check_model_folders(config)
    except ModelError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if tls:
        from services.bench.tls import TlsBenchConfig, run_tls_bench

        tls_config = TlsBenchConfig(config, streams=streams, probe_s=probe_s, rounds=rounds)
        try:
            result = asyncio.run(run_tls_bench(tls_config))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    else:
        result = asyncio.run(run_serving_bench(config))
    typer.echo(json.dumps(result, indent=None if json_output else 2))


def bench_swap(
    json_output: Annotated[bool, typer.Option("--json", help="Print only the JSON result.")] = False,
    swaps: Annotated[int, typer.Option(min=1, help="Promotions to serve under load.")] = 6,
    interval_s: Annotated[float, typer.Option(min=1, help="Seconds between promotions.")] = 8.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Streams kept open during the run.")] = 32,
    strategy: Annotated[str, typer.Option(help="Swap strategy: standby, engine or in_place.")] = "standby",
) -> None:
    """`distillery bench swap`: promotions served under load; failures, ITL during swaps, promotion to serving."""
    from services.bench.swap import default_swap_config, run_swap_bench

    if strategy not in ("standby", "engine", "in_place"):
        raise typer.BadParameter(f"strategy={strategy!r}: must be standby, engine or in_place")
    _bench_logging(json_output)
    config = default_swap_config(swaps=swaps, interval_s=interval_s, concurrency=concurrency, strategy=strategy)
    typer.echo(json.dumps(asyncio.run(run_swap_bench(config)), indent=None if json_output else 2))


def _bench_logging(quiet: bool) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s")
