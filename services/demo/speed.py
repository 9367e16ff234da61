"""Teacher vs student through the serving service, measured by `distillery bench serving`'s own code.

Runs after the pipeline's services have stopped, so both models get the machine to themselves: each is served by a
fresh `distillery serving serve` process and probed with the same load (the job's prompts, greedy): streams that end
with the answer for the capacity at 238 wpm, fixed-length ones for tokens/s, on the job's held-out prompts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.demo.profiles import Profile
from services.demo.report import DemoResult


def compare(
    result: DemoResult,
    home: Path,
    student_dir: Path,
    teacher_dir: Path,
    profile: Profile,
    chats: list[list[dict[str, str]]] | None = None,
) -> dict:
    from services.bench.serving import ServingBenchConfig, run_serving_bench

    config = ServingBenchConfig(
        home=home,
        probe_s=profile.capacity_window_s,
        equal_probe_s=profile.speed_window_s,
        max_tokens=profile.load_max_tokens,
        temperature=profile.load_temperature,
        start_concurrency=profile.speed_concurrency,
        max_concurrency=profile.max_capacity_streams,
        budget_s=profile.speed_budget_s,
        kv_cache_gib=profile.kv_cache_gib,
        enforce_eager=profile.enforce_eager,
        student_dir=student_dir,
        teacher_dir=teacher_dir,
        # Readers' streams end with the answer; tokens/s are compared at a fixed length.
        capacity_stop_at_eos=True,
        # The service against its engine driven directly is `distillery bench serving`'s question, not the demo's.
        raw_engine=False,
        # The job's own held-out prompts, as its users would send them.
        prompts=[[(m["role"], m["content"]) for m in chat] for chat in chats or []],
    )
    bench = asyncio.run(run_serving_bench(config))
    result.student_streams_at_target = bench["student_streams_at_target"]
    result.teacher_streams_at_target = bench["teacher_streams_at_target"]
    result.student_tokens_per_s = bench["student_tokens_per_s"]
    result.teacher_tokens_per_s = bench["teacher_tokens_per_s"]
    result.speed_concurrency = bench["equal_concurrency"]
    return bench
