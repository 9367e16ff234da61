"""`distillery bench serving`: how many readers the student serves versus the teacher, through the serving service.

For each model (the default student, then the default teacher) it starts `distillery serving serve` as a child
process, then searches for the largest number of concurrent Generate streams whose median words per minute stays at
or above the 238 wpm reading target: doubling until a probe fails, then bisecting, within a time budget. Each probe
is a load-generator run (`loadtest.py`) of `probe_s` seconds, in child processes of its own (`clients.py`). Tokens/s
of both models are compared at one equal concurrency (the teacher's capacity), and each model's engine is also
driven directly at that concurrency (`raw_engine.py`): `serving_vs_raw_vllm` is what the service keeps of it. Those
tokens/s are the probes' steady state (`loadtest.steady_rate`: from the end of the first wave of streams, which all
start at once), the whole probes' figures beside them. Both
models see the same prompts (the default built-in use case, or the given chats), the same sampling and the same
engine settings. The default student is the default recipe's, restricted head included (`students.py`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.bench.clients import child_pool, in_child, loadtest_in_children
from services.common.settings import READING_TARGET_WPM, distillery_home
from services.serving.loadtest import LoadtestConfig, run_loadtest
from services.serving.process import serving_process

logger = logging.getLogger(__name__)


@dataclass
class ServingBenchConfig:
    home: Path
    probe_s: float = 15.0
    """Seconds of load per probed concurrency."""
    equal_probe_s: float | None = None
    """Seconds of the fixed-length probe at the equal concurrency (and of the direct-engine run), whose steady state
    (`loadtest.steady_rate`, from the end of the first wave of streams) gives the tokens/s compared; it must hold
    several of the teacher's streams back to back (at 256 streams of 128 tokens, one lasts ≈20 s). None: `probe_s`,
    and a capacity probe at that concurrency serves when it was fixed-length too."""
    max_tokens: int = 128
    temperature: float = 0.0
    """Greedy by default: the default use case is judged on greedy answers. At T=1 the 49k-vocabulary sampler
    costs the small student a large share of its step (measured ≈40%)."""
    start_concurrency: int = 4
    max_concurrency: int = 4096
    budget_s: float = 1500.0
    """Time for both searches together (engine starts excluded)."""
    max_num_seqs: int = 1024
    kv_cache_gib: float = 2.0
    max_model_len: int = 1024
    enforce_eager: bool = False
    """Skip torch.compile in the engines (tiny models start much faster without it)."""
    student_dir: Path | None = None
    teacher_dir: Path | None = None
    prompts: list[list[tuple[str, str]]] = field(default_factory=list)
    """Chats the probes send (role, content); empty: the default built-in use case's prompts."""
    client_processes: int = 1
    """Processes the load generator runs in (none of them the benchmark's own)."""
    stream_interval_ms: float | None = None
    """The service's `stream_interval_ms` (tokens made within it go out as one message); None: its default."""
    student_head_coverage: float | None = None
    """The default student's LM head restricted to the default use case's tokens at this coverage
    (`services/bench/students.py`); 0: the full vocabulary; None: the default student recipe's coverage (0.99).
    Ignored with `student_dir`."""
    raw_engine: bool = True
    """Also drive each model's engine directly at the equal concurrency (`serving_vs_raw_vllm`)."""
    capacity_stop_at_eos: bool = False
    """Let the capacity probes' streams end where the model ends its answer, as users' streams do. Default: every
    stream generates `max_tokens` (the right load for an untrained student that never ends). A model forced past its
    end of turn writes whatever follows, and a trained student's digits and symbols carry few words per token
    (measured 0.25 vs the teacher's 0.72). Tokens/s at the equal concurrency are always measured at fixed length."""


def default_student(models_dir: Path, teacher_dir: Path, output_vocab_coverage: float | None = None) -> Path:
    """The trainer's default student (pruned from the teacher), built once and cached under `models_dir`; with
    `output_vocab_coverage`, the same student with its head restricted to the default use case's tokens
    (`services/bench/students.py`)."""
    from services.bench.students import full_default_student, trimmed_student

    full = full_default_student(models_dir, teacher_dir)
    return full if output_vocab_coverage is None else trimmed_student(models_dir, full, output_vocab_coverage)


def service_env(config: ServingBenchConfig, model_dir: Path) -> dict[str, str]:
    """One service for one model: no checkpoint watching, no standby, limits out of the way. Its registry is an empty
    folder of its own: serving starts from the newest promoted checkpoint of its registry when there is one, and
    `home` may hold a real registry (the demo's run folder does)."""
    return {
        "DISTILLERY_HOME": str(config.home),
        "DISTILLERY_SERVING_REGISTRY_DIR": str(config.home / "bench" / f"empty-registry-{uuid.uuid4().hex[:8]}"),
        "DISTILLERY_SERVING_INITIAL_MODEL": str(model_dir),
        "DISTILLERY_SERVING_WATCH_CHECKPOINTS": "false",
        "DISTILLERY_SERVING_SWAP__STRATEGY": "engine",
        "DISTILLERY_SERVING_VLLM__MAX_NUM_SEQS": str(config.max_num_seqs),
        "DISTILLERY_SERVING_VLLM__KV_CACHE_GIB": str(config.kv_cache_gib),
        "DISTILLERY_SERVING_VLLM__MAX_MODEL_LEN": str(config.max_model_len),
        "DISTILLERY_SERVING_VLLM__ENFORCE_EAGER": str(config.enforce_eager).lower(),
        "DISTILLERY_SERVING_LIMITS__MAX_CONCURRENT_STREAMS": str(config.max_concurrency * 2),
        "DISTILLERY_SERVING_MAX_CONCURRENT_RPCS": str(config.max_concurrency * 2 + 64),
        "DISTILLERY_SERVING_LOG_LEVEL": "WARNING",
    } | (
        {}
        if config.stream_interval_ms is None
        else {"DISTILLERY_SERVING_STREAM_INTERVAL_MS": str(config.stream_interval_ms)}
    )


def passes(summary: dict[str, Any]) -> bool:
    wpm = summary["wpm_p50"]
    return summary["failed"] == 0 and wpm is not None and wpm >= READING_TARGET_WPM


async def capacity_search(
    probe: Callable[[int], Any], start: int, cap: int, deadline: float
) -> tuple[int, list[dict[str, Any]]]:
    """Largest concurrency whose probe passes: double from `start` until one fails, then bisect (to within ~6%)."""
    best, worst = 0, None  # largest passing, smallest failing
    probes: list[dict[str, Any]] = []
    concurrency = start
    while time.monotonic() < deadline:
        summary = await probe(concurrency)
        probes.append(summary)
        if passes(summary):
            best = concurrency
        else:
            worst = concurrency
        if worst is None:
            if concurrency >= cap:
                break
            concurrency = min(cap, concurrency * 2)
            continue
        if worst - best <= max(1, best // 16):
            break
        concurrency = (best + worst) // 2
    return best, probes


def compared_rate(probe: dict[str, Any]) -> tuple[float, str]:
    """The tokens/s a fixed-length probe contributes to the comparison: its steady state where it has one
    (`loadtest.steady_rate`), else the whole probe's; and which it is."""
    steady = probe["tokens_per_s_steady"]
    return (steady, "steady") if steady else (probe["tokens_per_s"], "whole probe")


def _probe_row(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("concurrency", "wpm_p50", "wpm_p10", "tokens_per_s", "tokens_per_s_steady", "steady_from_s", "ttft_ms_p50",
            "itl_ms_p50", "itl_ms_p99",
            "failed", "streams")  # fmt: skip
    return {k: summary[k] for k in keys}


async def bench_model(
    config: ServingBenchConfig,
    name: str,
    model_dir: Path,
    budget_s: float,
    equal_at: int | None,
    clients: ProcessPoolExecutor | None = None,
) -> dict[str, Any]:
    """Capacity search for one model within `budget_s` after its engine is up; with `equal_at`, also one probe at
    that concurrency. The load runs in `clients`' processes (None: in this one)."""
    log = config.home / "bench" / f"serving-{name}.log"
    started = time.monotonic()
    async with serving_process(service_env(config, model_dir), log) as address:
        start_s = time.monotonic() - started
        deadline = time.monotonic() + budget_s

        async def probe(
            concurrency: int, fixed_length: bool = not config.capacity_stop_at_eos, duration_s: float | None = None
        ) -> dict[str, Any]:
            load = LoadtestConfig(
                address=address,
                concurrency=concurrency,
                duration_s=duration_s or config.probe_s,
                max_tokens=config.max_tokens,
                temperature=config.temperature,
                ignore_eos=fixed_length,
                prompts=config.prompts,
            )
            if clients is None:
                result = await run_loadtest(load)
            else:
                result = await loadtest_in_children(clients, load, config.client_processes)
            summary = result.summary()
            words = sum(s.words for s in result.streams)
            tokens = sum(s.tokens for s in result.streams)
            summary["words_per_token"] = round(words / tokens, 3) if tokens else None
            logger.info("%s at %d streams: p50 %s wpm, %s tokens/s", name, concurrency, summary["wpm_p50"],
                        summary["tokens_per_s"])  # fmt: skip
            return summary

        # The search gets its share of the remaining time; the equal-concurrency probe comes after it.
        best, probes = await capacity_search(probe, config.start_concurrency, config.max_concurrency, deadline)
        at = equal_at if equal_at is not None else best
        same = None
        if at:
            # A search probe at that concurrency serves when it was fixed-length too.
            if not config.capacity_stop_at_eos and config.equal_probe_s is None:
                same = next((p for p in probes if p["concurrency"] == at), None)
            if same is None:
                same = await probe(at, fixed_length=True, duration_s=config.equal_probe_s)
    ratios = [p["words_per_token"] for p in probes if p.get("words_per_token")]
    rate, measure = compared_rate(same) if same else (None, None)
    return {
        "model": str(model_dir),
        "streams_at_target": best,
        "tokens_per_s_at_equal_concurrency": rate,
        "tokens_per_s_at_equal_concurrency_whole_probe": same["tokens_per_s"] if same else None,
        "tokens_per_s_measure": measure,
        "steady_from_s": same["steady_from_s"] if same else None,
        "words_per_token": round(sum(ratios) / len(ratios), 3) if ratios else None,
        "engine_start_s": round(start_s, 1),
        "probes": [_probe_row(p) for p in probes],
    }


async def raw_engine(config: ServingBenchConfig, model_dir: Path, concurrency: int) -> dict[str, Any]:
    """The service's engine for `model_dir`, driven directly at `concurrency` in a child process of its own."""
    from services.bench.raw_engine import RawConfig, measure_raw
    from services.serving.loadtest import default_prompts

    raw = RawConfig(
        model_dir=model_dir,
        env=service_env(config, model_dir),
        concurrencies=(concurrency,),
        duration_s=config.equal_probe_s or config.probe_s,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        prompts=config.prompts or default_prompts(),
    )
    with child_pool(1) as pool:
        result = await in_child(pool, measure_raw, raw)
    probe = result["probes"][0]
    logger.info("%s engine alone at %d streams: %s tokens/s (%s in the steady state)", model_dir.name, concurrency,
                probe["tokens_per_s"], probe["tokens_per_s_steady"])  # fmt: skip
    rate, measure = compared_rate(probe)
    return {
        "tokens_per_s": rate,
        "tokens_per_s_whole_probe": probe["tokens_per_s"],
        "tokens_per_s_measure": measure,
        "steady_from_s": probe["steady_from_s"],
        "streams": probe["streams"],
        "engine_start_s": result["engine_start_s"],
    }


def check_model_folders(config: ServingBenchConfig) -> None:
    """Given model folders are Hugging Face folders with safetensors weights: `distillery bench serving` refuses
    others before any engine starts."""
    from services.common.models import ModelError, check_safe_folder

    for which, folder in (("student", config.student_dir), ("teacher", config.teacher_dir)):
        if folder is None:
            continue
        if not (folder / "config.json").is_file():
            raise ModelError(f"{which}={folder}: no config.json, not a Hugging Face model folder")
        check_safe_folder(folder)


async def run_serving_bench(config: ServingBenchConfig) -> dict[str, Any]:
    from services.bench.students import output_vocab_info
    from services.common.models import parameter_count, prepare_default_teacher

    started = time.monotonic()
    models_dir = config.home / "models"
    teacher_dir = config.teacher_dir
    if teacher_dir is None:
        teacher_dir = await asyncio.to_thread(prepare_default_teacher, models_dir)
    student_dir = config.student_dir
    if student_dir is None:
        coverage = config.student_head_coverage
        if coverage is None:
            from services.trainer.recipes import DEFAULT_STUDENT_RECIPE

            coverage = DEFAULT_STUDENT_RECIPE.output_vocab_coverage
        student_dir = await asyncio.to_thread(default_student, models_dir, teacher_dir, coverage or None)
    # Teacher first: its capacity is the concurrency both models are compared at for tokens/s.
    with child_pool(config.client_processes) as clients:
        teacher = await bench_model(config, "teacher", teacher_dir, config.budget_s / 2, None, clients)
        equal = max(1, teacher["streams_at_target"])
        if config.raw_engine:
            teacher["raw_engine"] = await raw_engine(config, teacher_dir, equal)
        student = await bench_model(config, "student", student_dir, config.budget_s / 2, equal, clients)
        if config.raw_engine:
            student["raw_engine"] = await raw_engine(config, student_dir, equal)
    s_tps, t_tps = student["tokens_per_s_at_equal_concurrency"], teacher["tokens_per_s_at_equal_concurrency"]
    vs_raw = {
        name: round(model["tokens_per_s_at_equal_concurrency"] / model["raw_engine"]["tokens_per_s"], 3)
        for name, model in (("student", student), ("teacher", teacher))
        if model.get("raw_engine")
        and model["raw_engine"]["tokens_per_s"]
        and model["tokens_per_s_at_equal_concurrency"]
    }
    raw_s = student.get("raw_engine", {}).get("tokens_per_s")
    raw_t = teacher.get("raw_engine", {}).get("tokens_per_s")
    return {
        "student_streams_at_target": student["streams_at_target"],
        "teacher_streams_at_target": teacher["streams_at_target"],
        "capacity_ratio": (
            round(student["streams_at_target"] / teacher["streams_at_target"], 2)
            if teacher["streams_at_target"]
            else None
        ),
        "student_tokens_per_s": s_tps,
        "teacher_tokens_per_s": t_tps,
        "speed_ratio": round(s_tps / t_tps, 2) if s_tps and t_tps else None,
        "equal_concurrency": equal,
        "serving_vs_raw_vllm": vs_raw,
        "raw_speed_ratio": round(raw_s / raw_t, 2) if raw_s and raw_t else None,
        "reading_target_wpm": READING_TARGET_WPM,
        "student_parameters": parameter_count(student_dir),
        "student_output_vocab": output_vocab_info(student_dir),
        "teacher_parameters": parameter_count(teacher_dir),
        "student": student,
        "teacher": teacher,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "prompts"},
        "cpus": len(os.sched_getaffinity(0)),
        "seconds": round(time.monotonic() - started, 1),
    }


def default_config(**overrides: Any) -> ServingBenchConfig:
    return ServingBenchConfig(home=overrides.pop("home", None) or distillery_home(), **overrides)
