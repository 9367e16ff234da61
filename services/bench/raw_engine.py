"""The serving service's own engine driven directly: tokens/s without gRPC, protobuf or a client.

`distillery bench serving` compares the service with this at equal concurrency (`serving_vs_raw_vllm`): the same
`VllmEngine` class the service runs, started from the same environment (so the same vLLM settings, dtype, threads
and KV cache), the same chats encoded by the same tokenizer, the same sampling, `ignore_eos`, streams generated back
to back for a fixed time and cut at the deadline, tokens counted as they arrive (over the whole probe, and in its
steady state: `loadtest.steady_rate`). Like the service, it encodes each
stream's chat when the stream starts, with the service's `off_loop` (short chats at once, longer ones on a
tokenizer thread); what it leaves out is gRPC, protobuf, the load
generator, the service's admission checks and metrics, and the stream interval's merging. Runs in a child process
(`clients.child_pool`), one engine start for every concurrency asked.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RawConfig:
    model_dir: Path
    env: dict[str, str]
    """The service's environment (`services.bench.serving.service_env`): its settings, read the same way."""
    concurrencies: tuple[int, ...]
    duration_s: float
    max_tokens: int
    temperature: float
    prompts: Sequence[Sequence[tuple[str, str]]]


async def _probe(engine: Any, config: RawConfig, concurrency: int) -> dict[str, Any]:
    from services.common.prompt_size import off_loop, prompt_chars
    from services.serving.engine import Sampling
    from services.serving.loadtest import StreamRecord, steady_rate

    sampling = Sampling(max_tokens=config.max_tokens, temperature=config.temperature, ignore_eos=True)
    counter = itertools.count()
    records: list[StreamRecord] = []
    started = time.perf_counter()
    deadline = started + config.duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            record = StreamRecord(started=time.perf_counter())
            records.append(record)
            prompt = config.prompts[i % len(config.prompts)]
            # Each stream encodes its chat, as the service does for each request (any server must).
            ids = await off_loop(engine.encode_chat, prompt, chars=prompt_chars(prompt))
            try:
                async for chunk in engine.generate(ids, sampling, f"raw-{concurrency}-{i}"):
                    record.arrived(len(chunk.token_ids), time.perf_counter())  # as the load generator counts them
            except asyncio.CancelledError:
                record.cut = True
                raise

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=config.duration_s)
    for task in pending:
        task.cancel()  # streams open at the deadline are cut (the engine aborts them), as the load generator does
    await asyncio.gather(*tasks, return_exceptions=True)
    finished = time.perf_counter()
    tokens = sum(r.tokens for r in records)
    steady = steady_rate(records, concurrency, min(finished, deadline))  # the aborts after the deadline are not load
    return {
        "concurrency": concurrency,
        "tokens_per_s": round(tokens / (finished - started), 1),
        "tokens_per_s_steady": round(steady[0], 1) if steady else None,
        "steady_from_s": round(steady[1] - started, 2) if steady else None,
        "streams": len(records),
    }


async def _measure(config: RawConfig) -> dict[str, Any]:
    os.environ.update(config.env)
    from services.serving.engine import VllmEngine
    from services.serving.settings import ServingSettings

    settings = ServingSettings()
    started = time.perf_counter()
    engine = await VllmEngine.start(config.model_dir, settings.engine_settings())
    start_s = time.perf_counter() - started
    try:
        await engine.probe(8)  # the service warms an engine up before it serves; so does this
        probes = [await _probe(engine, config, c) for c in config.concurrencies]
    finally:
        await engine.shutdown()
    return {"engine_start_s": round(start_s, 1), "probes": probes}


def measure_raw(config: RawConfig) -> dict[str, Any]:
    """Runs in a child process: start the engine, probe each concurrency, stop."""
    import logging

    from services.common.process import stdout_to_stderr

    logging.basicConfig(level=logging.WARNING)
    with stdout_to_stderr():  # vLLM logs to stdout; the benchmark's stdout is its JSON
        return asyncio.run(_measure(config))
