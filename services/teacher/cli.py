"""`distillery teacher serve`, `distillery prompts publish` and `distillery bench teacher`."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="The teacher service (vLLM) and its Kafka pipeline worker.", no_args_is_help=True)
prompts_app = typer.Typer(help="Feed prompts into distillery.prompts.v1.", no_args_is_help=True)
console = Console(stderr=True)


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="Prepared model name or a Hugging Face folder.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (0.0.0.0 in containers).")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port (default 50051; 0 picks one).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="/metrics port (default 9101; 0 picks one).")] = None,
    worker: Annotated[
        bool | None, typer.Option("--worker/--no-worker", help="Run the prompts → samples Kafka worker.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts the worker keeps in the engine at once.")] = None,
    kv_cache_gib: Annotated[float | None, typer.Option(help="vLLM KV-cache size in GiB.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Longest prompt + completion in tokens.")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Sequences in vLLM's continuous batch.")] = None,
    enforce_eager: Annotated[
        bool | None, typer.Option("--enforce-eager/--compile", help="Skip torch.compile (faster start).")
    ] = None,
) -> None:
    """Runs the teacher gRPC service and its prompt → sample pipeline worker (settings: DISTILLERY_TEACHER_*)."""
    from services.teacher.main import run
    from services.teacher.settings import TeacherSettings

    top: dict[str, Any] = {"model": model, "host": host, "grpc_port": grpc_port, "metrics_port": metrics_port}
    vllm: dict[str, Any] = {
        "kv_cache_gib": kv_cache_gib,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "enforce_eager": enforce_eager,
    }
    work: dict[str, Any] = {"enabled": worker, "batch_size": batch_size}
    # Options given on the command line win over the environment; pydantic-settings merges nested fields.
    settings = TeacherSettings(
        **{k: v for k, v in top.items() if v is not None},
        vllm={k: v for k, v in vllm.items() if v is not None},
        worker={k: v for k, v in work.items() if v is not None},
    )
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        console.print(f"[red]teacher stopped: {exc}[/red]")
        raise typer.Exit(1) from None


@prompts_app.command()
def publish(
    file: Annotated[Path, typer.Argument(help="JSONL: one prompt per line (see services/teacher/prompts.py).")],
    skip_bad: Annotated[
        bool, typer.Option(help="Publish the good lines even when some are bad (default: publish nothing).")
    ] = False,
) -> None:
    """Publishes prompts from a JSONL file to distillery.prompts.v1 (bad lines are reported with line numbers)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.common import pb
    from services.common.settings import KafkaSettings
    from services.teacher.prompts import BadLine, read_jsonl
    from services.teacher.prompts import publish as publish_records

    if not file.is_file():
        console.print(f"[red]{file}: no such file[/red]")
        raise typer.Exit(2)
    records: list[pb.common.PromptRecord] = []
    bad: list[BadLine] = []
    for _, item in read_jsonl(file):
        if isinstance(item, BadLine):
            bad.append(item)
        else:
            records.append(item)
    for line in bad:
        console.print(f"[red]{file}:{line.line}: {line.error}[/red]")
    if bad and not skip_bad:
        console.print(f"{len(bad)} bad line(s): nothing published (use --skip-bad to publish the rest)")
        raise typer.Exit(1)
    kafka = KafkaSettings()
    with Progress(
        TextColumn("publishing prompts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("publish", total=len(records))
        sent = publish_records(kafka, records, on_sent=lambda _r: progress.advance(task))
    console.print(f"published {sent} prompt(s) to {kafka.topic_prompts}" + (f", skipped {len(bad)}" if bad else ""))
    print(json.dumps({"published": sent, "bad_lines": [b.line for b in bad], "topic": kafka.topic_prompts}))


def bench(
    json_output: Annotated[bool, typer.Option("--json", help="Only the JSON result on stdout.")] = False,
    prompts: Annotated[int, typer.Option(help="Prompts (of the default built-in use case) per measurement.")] = 64,
    max_tokens: Annotated[int, typer.Option(help="Most tokens generated per prompt.")] = 128,
    ignore_eos: Annotated[
        bool, typer.Option(help="Run every completion to max_tokens (identical work in all three runs).")
    ] = False,
    top_k: Annotated[int, typer.Option(help="Top-k logprobs per token.")] = 20,
    hf_batch_size: Annotated[int, typer.Option(help="Batch size of the transformers baseline.")] = 32,
    hf_threads: Annotated[int, typer.Option(help="torch threads of the transformers baseline (0: all cores).")] = 0,
    max_num_seqs: Annotated[int, typer.Option(help="vLLM continuous batch size (service and raw).")] = 128,
    enforce_eager: Annotated[bool, typer.Option(help="Skip torch.compile in both vLLM runs.")] = False,
    model: Annotated[str | None, typer.Option(help="Teacher (default: the prepared default teacher).")] = None,
    skip_hf: Annotated[bool, typer.Option(help="Leave out the transformers baseline.")] = False,
) -> None:
    """`distillery bench teacher`: service vs offline vLLM vs transformers on the same prompts, in one run."""
    from services.bench.teacher import BenchConfig, run_bench

    config = BenchConfig(
        prompts=prompts,
        max_tokens=max_tokens,
        top_k=top_k,
        hf_batch_size=hf_batch_size,
        hf_threads=hf_threads,
        max_num_seqs=max_num_seqs,
        enforce_eager=enforce_eager,
        model=model,
        skip_hf=skip_hf,
        ignore_eos=ignore_eos,
    )
    result: dict[str, Any] = run_bench(config, console)
    if not json_output:
        console.print_json(data=result)
    sys.stdout.write(json.dumps(result) + "\n")
