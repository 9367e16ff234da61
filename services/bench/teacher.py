"""`distillery bench teacher`: the teacher service against offline vLLM and transformers, same prompts, one run.

1. service: a `TeacherApp` (engine + worker) on fresh topics; the clock runs from publishing the prompts to
   the last teacher sample read back from the samples topic: Kafka in, generation, packing, Kafka out.
2. raw vLLM: `vllm.LLM.generate` on the same prompt tokens with the same sampling and top-k logprobs.
3. transformers: `generate` in batches (left padding), same sampling, with the top-k logprobs computed
   from the scores, as a teacher needs them.
Tokens per second count generated tokens (the end-of-sequence token included). The engine starts are outside the
clocks; each engine gets a short warm-up first. Completions stop at end-of-sequence like real teacher answers
(a static transformers batch then idles on rows that finished, which continuous batching avoids); `--ignore-eos`
runs every completion to max_tokens instead, so all three do exactly the same work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.common import pb
from services.common.settings import KafkaSettings
from services.common.vllm_engine import VllmSettings


@dataclass
class BenchConfig:
    prompts: int = 64
    max_tokens: int = 128
    top_k: int = 20
    hf_batch_size: int = 32
    #: torch threads of the transformers run; 0 = every core the process may use.
    hf_threads: int = 0
    max_num_seqs: int = 128
    enforce_eager: bool = False
    model: str | None = None
    skip_hf: bool = False
    ignore_eos: bool = False
    temperature: float = 1.0
    kv_cache_gib: float = 1.0
    seed: int = 0


@contextlib.contextmanager
def _kafka(base: KafkaSettings) -> Iterator[KafkaSettings]:
    """The configured cluster or running embedded broker, else a private embedded broker; fresh topic names."""
    from services.common import broker
    from services.common.kafka import NoBroker, resolve_bootstrap

    suffix = uuid.uuid4().hex[:8]
    topics = {
        name: f"bench.{suffix}.{name.removeprefix('topic_')}"
        for name in ("topic_prompts", "topic_teacher_samples", "topic_checkpoints", "topic_dead_letters")
    }
    try:
        bootstrap = resolve_bootstrap(base)
        yield base.model_copy(update={"bootstrap": bootstrap, **topics})
    except NoBroker:
        with tempfile.TemporaryDirectory(prefix="distillery-bench-") as home, broker.embedded(Path(home)) as state:
            yield base.model_copy(update={"bootstrap": state.bootstrap, **topics})


def _sampling(config: BenchConfig) -> pb.common.SamplingParams:
    msg = pb.common.SamplingParams(
        temperature=config.temperature, max_tokens=config.max_tokens, logprobs=config.top_k, n=1
    )
    if config.ignore_eos:
        msg.extra["ignore_eos"] = "true"
    return msg


def _records(config: BenchConfig, sampling: pb.common.SamplingParams) -> list[pb.common.PromptRecord]:
    from services.tasks.builtin import DEFAULT_TASK, default_prompts
    from services.teacher.prompts import example_record

    return [example_record(e, DEFAULT_TASK, sampling) for e in default_prompts(config.prompts, seed=1234)]


async def _bench_service(
    config: BenchConfig,
    model_dir: Path,
    kafka: KafkaSettings,
    vllm: VllmSettings,
    records: list[pb.common.PromptRecord],
    progress: Progress,
) -> tuple[dict[str, Any], list[list[int]]]:
    from services.common.kafka import ProtoConsumer, ProtoProducer
    from services.teacher.engine import Prompt
    from services.teacher.inputs import chat_messages
    from services.teacher.main import TeacherApp
    from services.teacher.prompts import publish
    from services.teacher.sampling import sampling_from_proto
    from services.teacher.settings import TeacherSettings

    settings = TeacherSettings(model=str(model_dir), grpc_port=0, metrics_port=0, vllm=vllm, kafka=kafka)
    task = progress.add_task("service: starting engine", total=len(records))
    app = await TeacherApp.create(settings)
    try:
        # Warm-up outside the clock (first steps allocate and compile).
        warm = app.engine.render(text="Warm up the teacher.")
        warm_sampling = sampling_from_proto(pb.common.SamplingParams(max_tokens=8, logprobs=config.top_k), app.limits)
        async for _ in app.engine.generate(Prompt(warm.text, warm.token_ids), warm_sampling):
            pass
        prompt_ids = [app.engine.render(messages=chat_messages(r.chat.messages)).token_ids for r in records]
        await app.start(metrics_server=False)
        assert app.worker is not None
        await asyncio.wait_for(app.worker.assigned.wait(), 60)
        samples_consumer = await asyncio.to_thread(
            ProtoConsumer,
            kafka,
            kafka.topic_teacher_samples,
            pb.common.TeacherSample,
            group_id=f"bench-{uuid.uuid4().hex[:8]}",
            client_name="bench-samples",
        )
        producer = await asyncio.to_thread(ProtoProducer, kafka, "bench")
        progress.update(task, description="service: prompts topic → samples topic")
        started = time.perf_counter()
        await asyncio.to_thread(publish, kafka, records, None, producer)
        seen: set[str] = set()
        tokens = 0
        while len(seen) < len(records):
            if app.fatal.done():
                app.fatal.result()
            for received in await asyncio.to_thread(samples_consumer.poll, 0.2):
                sample = received.value
                if sample is None or sample.sample_id in seen:
                    continue
                seen.add(sample.sample_id)
                tokens += len(sample.completion_token_ids)
                progress.advance(task)
        elapsed = time.perf_counter() - started
        await asyncio.to_thread(samples_consumer.close)
        await asyncio.to_thread(producer.close)
    finally:
        await app.close()
    progress.update(task, description="service: done")
    return {"tokens": tokens, "seconds": elapsed, "samples": len(seen)}, prompt_ids


def _bench_raw_vllm(
    config: BenchConfig, model_dir: Path, vllm: VllmSettings, prompt_ids: list[list[int]], progress: Progress
) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from services.common.vllm_engine import offline_llm

    task = progress.add_task("raw vLLM: starting engine", total=len(prompt_ids))
    with offline_llm(model_dir, vllm) as llm:
        params = SamplingParams(
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            logprobs=config.top_k,
            ignore_eos=config.ignore_eos,
        )
        llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[0])], params, use_tqdm=False)  # warm-up
        progress.update(task, description="raw vLLM: LLM.generate")
        started = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        progress.update(task, completed=len(prompt_ids), description="raw vLLM: done")
    return {"tokens": tokens, "seconds": elapsed}


def _bench_hf(config: BenchConfig, model_dir: Path, prompt_ids: list[list[int]], progress: Progress) -> dict[str, Any]:
    import torch

    from services.common.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(config.hf_threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(config.seed)
    task = progress.add_task("transformers: loading", total=len(prompt_ids))
    model = load_causal_lm(model_dir, dtype=torch.bfloat16).eval()
    tokenizer = load_tokenizer(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The same warm-up vLLM gets (one short generation off the clock: first-call allocations, oneDNN kernels).
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([prompt_ids[0]]), max_new_tokens=8, do_sample=False, pad_token_id=pad)
    progress.update(task, description="transformers: generate")
    tokens = 0
    started = time.perf_counter()
    for start in range(0, len(prompt_ids), config.hf_batch_size):
        batch = prompt_ids[start : start + config.hf_batch_size]
        width = max(len(ids) for ids in batch)
        # Left padding: every row's last prompt token sits at the same position.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])  # [B, T]
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])  # [B, T]
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                do_sample=True,
                temperature=config.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=config.max_tokens,
                min_new_tokens=config.max_tokens if config.ignore_eos else 0,
                pad_token_id=pad,
                output_logits=True,
                return_dict_in_generate=True,
            )
            # The teacher's product: top-k logprobs of the raw distribution at every generated position.
            for logits in out.logits:  # one [B, V] tensor per step
                torch.log_softmax(logits.float(), dim=-1).topk(config.top_k, dim=-1)
        generated = out.sequences[:, width:]  # [B, new]
        tokens += _count_generated(generated, tokenizer.eos_token_id, config.ignore_eos)
        progress.advance(task, len(batch))
    elapsed = time.perf_counter() - started
    progress.update(task, description="transformers: done")
    return {"tokens": tokens, "seconds": elapsed, "threads": torch.get_num_threads()}


def _count_generated(generated: Any, eos: int | None, ignore_eos: bool) -> int:
    """Tokens up to and including each row's first end-of-sequence token (the rest is padding)."""
    if ignore_eos or eos is None:
        return int(generated.numel())
    total = 0
    for row in generated.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


def run_bench(config: BenchConfig, console: Console) -> dict[str, Any]:
    # stdout carries only the JSON result: vLLM logs to stdout unless told otherwise (read at its import).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from services.common.models import resolve_model
    from services.teacher.settings import TeacherSettings

    teacher = TeacherSettings()
    model = config.model or teacher.model
    model_dir = resolve_model(model, teacher.models)
    vllm = teacher.vllm.model_copy(
        update={
            "max_num_seqs": config.max_num_seqs,
            "enforce_eager": config.enforce_eager,
            "kv_cache_gib": config.kv_cache_gib,
            "seed": config.seed,
            "max_logprobs": max(config.top_k, teacher.vllm.max_logprobs),
        }
    )
    sampling = _sampling(config)
    records = _records(config, sampling)
    result: dict[str, Any] = {
        "model": Path(model).name,
        "config": asdict(config),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    }
    with (
        Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress,
        _kafka(teacher.kafka) as kafka,
    ):
        service, prompt_ids = asyncio.run(_bench_service(config, model_dir, kafka, vllm, records, progress))
        raw = _bench_raw_vllm(config, model_dir, vllm, prompt_ids, progress)
        hf = None if config.skip_hf else _bench_hf(config, model_dir, prompt_ids, progress)
    result["service_tokens_per_s"] = round(service["tokens"] / service["seconds"], 1)
    result["raw_vllm_tokens_per_s"] = round(raw["tokens"] / raw["seconds"], 1)
    result["service_vs_raw_vllm"] = round(result["service_tokens_per_s"] / result["raw_vllm_tokens_per_s"], 3)
    if hf is not None:
        result["hf_generate_tokens_per_s"] = round(hf["tokens"] / hf["seconds"], 1)
        result["vllm_vs_hf"] = round(result["raw_vllm_tokens_per_s"] / result["hf_generate_tokens_per_s"], 3)
        result["service_vs_hf"] = round(result["service_tokens_per_s"] / result["hf_generate_tokens_per_s"], 3)
    result["detail"] = {"service": service, "raw_vllm": raw, "hf_generate": hf}
    # Other work on the machine skews the three runs unevenly (a multi-threaded transformers run suffers most).
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return result
