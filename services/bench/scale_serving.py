"""Serving replicas for the scale benchmark: n `distillery serving serve` processes of one student, equal load on each.

`measure_serving(n)` starts n replicas as a Deployment runs them (same settings, no shared state), splits the
machine's cores between their engines, and drives `streams_per_replica` × n concurrent Generate streams through one
round-robin channel over all of them, as a client balancing over a headless Service does. It returns tokens/s,
inter-token latency percentiles, failed requests and how the streams were spread. The load generator runs in this
process, beside the replicas: on a small machine it takes CPU from them, the same for every n.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.common.channels import ClientSettings
from services.common.metrics import read_metrics
from services.common.process import ServiceProcess
from services.common.settings import distillery_home
from services.serving.loadtest import LoadtestConfig, percentile, run_loadtest
from services.serving.process import serving_replicas, target_of

logger = logging.getLogger(__name__)

STREAMS_OK = 'distillery_serving_streams_total{result="ok"}'


@dataclass
class ScaleServingConfig:
    n_replicas: int
    home: Path
    student: str = "default"
    """"default": the trainer's default student pruned from the packaged teacher (built once, cached); "tiny": a
    random 2-layer Llama (seconds to build, for tests); or a model folder."""
    streams_per_replica: int = 16
    """Concurrent streams per replica: the total load grows with n (each replica gets the same share)."""
    duration_s: float = 30.0
    """Measured load."""
    warmup_s: float = 5.0
    """Load before the measurement (engines' first batches, the channel connecting to every replica); discarded."""
    max_tokens: int = 64
    temperature: float = 0.0
    pin_cores: bool = True
    """Give each replica's engine its own cores (an equal split of this process's CPU affinity), as pods with CPU
    limits get; with more replicas than cores they share them, one OpenMP thread each."""
    max_cores: int | None = None
    """Use only the first this many cores of this process's affinity (e.g. 1 replica on 1 core: the per-replica
    baseline for n replicas on a core each). None: all of them."""
    enforce_eager: bool = True
    """Skip torch.compile: engine starts in seconds instead of minutes; steps are slower (the same for every n)."""
    kv_cache_gib: float = 0.5
    max_model_len: int = 1024
    start_timeout_s: float = 900.0


def core_split(cores: list[int], n: int) -> list[list[int]]:
    """`cores` in `n` contiguous, near-equal groups; with fewer cores than groups, every group shares all of them."""
    if n > len(cores):
        return [cores] * n
    size, extra = divmod(len(cores), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        groups.append(cores[start:end])
        start = end
    return groups


def replica_env(config: ScaleServingConfig, model: Path, cores: list[int] | None) -> dict[str, str]:
    """One replica: the model as its start-up model, an empty registry of the run's own, no checkpoint watching (a
    measurement of serving alone: no broker), no standby engine (nothing swaps), limits out of the way."""
    limit = config.streams_per_replica * 2 + 16
    env = {
        "DISTILLERY_HOME": str(config.home),
        "DISTILLERY_SERVING_REGISTRY_DIR": str(config.home / "bench" / f"empty-registry-{uuid.uuid4().hex[:8]}"),
        "DISTILLERY_SERVING_INITIAL_MODEL": str(model),
        "DISTILLERY_SERVING_WATCH_CHECKPOINTS": "false",
        "DISTILLERY_SERVING_SWAP__STRATEGY": "engine",
        "DISTILLERY_SERVING_VLLM__MAX_NUM_SEQS": str(max(16, config.streams_per_replica * 2)),
        "DISTILLERY_SERVING_VLLM__KV_CACHE_GIB": str(config.kv_cache_gib),
        "DISTILLERY_SERVING_VLLM__MAX_MODEL_LEN": str(config.max_model_len),
        "DISTILLERY_SERVING_VLLM__ENFORCE_EAGER": str(config.enforce_eager).lower(),
        "DISTILLERY_SERVING_LIMITS__MAX_CONCURRENT_STREAMS": str(limit),
        "DISTILLERY_SERVING_MAX_CONCURRENT_RPCS": str(limit + 64),
        "DISTILLERY_SERVING_LOG_LEVEL": "WARNING",
    }
    if cores is not None:
        env["DISTILLERY_SERVING_VLLM__CPU_BIND"] = ",".join(map(str, cores))
        env["DISTILLERY_SERVING_VLLM__OMP_THREADS"] = str(len(cores))
    return env


def resolve_student(config: ScaleServingConfig) -> Path:
    if config.student == "default":
        from services.bench.serving import default_student
        from services.common.models import prepare_default_teacher

        models_dir = config.home / "models"
        return default_student(models_dir, prepare_default_teacher(models_dir))
    if config.student == "tiny":
        from services.common.tiny import build_llama

        folder = config.home / "bench" / "scale-tiny-student"
        return folder if (folder / "model.safetensors").is_file() else build_llama(folder, seed=1)
    return Path(config.student)


def _streams_ok(replicas: list[ServiceProcess]) -> list[float]:
    return [read_metrics(r.metrics_url).get(STREAMS_OK, 0.0) for r in replicas]


async def measure_serving_async(config: ScaleServingConfig) -> dict[str, Any]:
    """`measure_serving` inside a running event loop."""
    if config.n_replicas < 1:
        raise ValueError(f"n_replicas={config.n_replicas}: at least one replica")
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    model = await asyncio.to_thread(resolve_student, config)
    cores = sorted(os.sched_getaffinity(0))[: config.max_cores]
    groups: list[list[int] | None] = (
        list(core_split(cores, config.n_replicas)) if config.pin_cores else [None] * config.n_replicas
    )
    log_dir = config.home / "bench" / f"scale-serving-{config.n_replicas}-{uuid.uuid4().hex[:8]}"
    envs = [replica_env(config, model, g) for g in groups]
    concurrency = config.streams_per_replica * config.n_replicas
    async with serving_replicas(config.n_replicas, envs, log_dir, config.start_timeout_s) as replicas:
        ready_s = time.monotonic() - started

        def load(duration_s: float) -> LoadtestConfig:
            return LoadtestConfig(
                address=target_of(replicas), concurrency=concurrency, duration_s=duration_s,
                max_tokens=config.max_tokens, temperature=config.temperature,
                client=ClientSettings(lb_policy="round_robin"),
            )  # fmt: skip

        if config.warmup_s > 0:
            await run_loadtest(load(config.warmup_s))
        before = await asyncio.to_thread(_streams_ok, replicas)
        result = await run_loadtest(load(config.duration_s))
        after = await asyncio.to_thread(_streams_ok, replicas)
    summary = result.summary()
    gaps = [g for s in result.streams if s.error is None for g in s.gaps]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {
        "n_replicas": config.n_replicas,
        "tokens_per_s": summary["tokens_per_s"],
        "tokens_per_s_per_replica": round(summary["tokens_per_s"] / config.n_replicas, 1),
        "itl_ms_p50": ms(percentile(gaps, 50)),
        "itl_ms_p95": ms(percentile(gaps, 95)),
        "ttft_ms_p50": summary["ttft_ms_p50"],
        "wpm_p50": summary["wpm_p50"],
        "failed_requests": summary["failed"],
        "errors": summary["errors"],
        "streams": summary["streams"],
        "completed_streams_by_replica": [int(b - a) for a, b in zip(before, after, strict=True)],
        "concurrency": concurrency,
        "cores": len(cores),
        "cores_by_replica": [len(g) if g is not None else len(cores) for g in groups],
        "model": str(model),
        "replicas_ready_s": round(ready_s, 1),
        # Other work on the machine moves these figures (an engine's OpenMP team stalls when a thread is preempted).
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "seconds": round(time.monotonic() - started, 1),
    }


def measure_serving(n_replicas: int, home: Path | None = None, **options: Any) -> dict[str, Any]:
    """Starts `n_replicas` serving replicas of the student, drives equal load over them (round robin), and returns
    tokens/s, p50/p95 inter-token latency and failed requests (plus the spread and the setup); stops them all.
    `options`: the fields of `ScaleServingConfig`. Runs its own event loop."""
    config = ScaleServingConfig(n_replicas=n_replicas, home=home or distillery_home(), **options)
    return asyncio.run(measure_serving_async(config))
