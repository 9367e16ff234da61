"""Engine settings → vLLM's environment and arguments (no engine is started here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.settings import cpu_list
from services.common.vllm_engine import VllmSettings, engine_kwargs, engine_process_env


def test_cpu_list_parses_ranges_and_lists() -> None:
    assert cpu_list("1") == [1]
    assert cpu_list("0-2,5") == [0, 1, 2, 5]
    assert cpu_list("3,1-2,2") == [1, 2, 3]


@pytest.mark.parametrize("spec", ["", "a", "1-x", "-1", "0,,1"])
def test_bad_cpu_bind_is_refused_naming_the_field(spec: str) -> None:
    with pytest.raises(ValidationError, match="cpu_bind"):
        VllmSettings(cpu_bind=spec)


@pytest.mark.parametrize("executor, flag", [("uni", "0"), ("mp", "1")])
def test_executor_reaches_vllm(executor: str, flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset")
    kwargs = engine_kwargs(Path("model"), VllmSettings(executor=executor))  # type: ignore[arg-type]
    assert kwargs["distributed_executor_backend"] == executor
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == flag


def test_uni_engine_process_gets_the_binding_only_while_it_is_spawned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_PLACES", raising=False)
    with engine_process_env(VllmSettings(cpu_bind="1")):
        assert os.environ["OMP_PLACES"] == "{1}"
        assert os.environ["OMP_PROC_BIND"] == "true"
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert "OMP_PLACES" not in os.environ
    assert os.environ["OMP_NUM_THREADS"] == "2"


@pytest.mark.parametrize("settings", [VllmSettings(), VllmSettings(cpu_bind="0-1", executor="mp")])
def test_no_binding_when_vllm_binds_or_none_is_asked(settings: VllmSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_PLACES", raising=False)
    with engine_process_env(settings):
        assert "OMP_PLACES" not in os.environ


def test_explicit_thread_count_wins_over_an_inherited_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    engine_kwargs(Path("model"), VllmSettings())
    assert os.environ["OMP_NUM_THREADS"] == "4"  # a CPU limit from the environment is kept
    engine_kwargs(Path("model"), VllmSettings(omp_threads=3))
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_compile_cache_that_loads_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    engine_kwargs(Path("model"), VllmSettings())
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "0"  # the AOT cache never loads on CPU: a recompile per start
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    engine_kwargs(Path("model"), VllmSettings())
    assert os.environ["VLLM_USE_AOT_COMPILE"] == "1"  # an explicit choice is kept


def test_auto_dtype_is_float32_where_the_cpu_emulates_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an AVX2 CPU bf16 is emulated (the default teacher: 29 tokens/s in bfloat16, 138 in float32)."""
    import torch

    from services.common import cpu
    from services.common.vllm_engine import VllmSettings, engine_dtype, engine_kwargs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert engine_dtype("auto") == "float32"
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert engine_dtype("auto") == "bfloat16"
    assert engine_dtype("float16") == "float16"
    assert VllmSettings().dtype == "auto"
    assert engine_kwargs(Path("/m"), VllmSettings(dtype="float32"))["dtype"] == "float32"


def test_amx_permission_is_asked_only_where_the_cpu_has_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's AMX attention kernel was SIGILL (exit -4) in a process that had not asked Linux for AMX tiles:
    engine_kwargs (in-process engines) and every engine-core process now ask first."""
    import subprocess
    import sys

    from services.common import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    assert cpu.enable_amx() is False
    monkeypatch.undo()
    script = (
        "import ctypes, sys\n"
        "from services.common.cpu import cpu_flags, enable_amx\n"
        "granted = enable_amx()\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "perm = ctypes.c_ulong(0)\n"
        "libc.syscall(158, 0x1022, ctypes.byref(perm))  # arch_prctl(ARCH_GET_XCOMP_PERM)\n"
        "print(int('amx_tile' in cpu_flags()), int(granted), int(bool(perm.value & (1 << 18))))\n"
    )
    has_tiles, granted, permitted = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert granted == has_tiles and permitted == has_tiles  # tiles (XTILEDATA, bit 18) permitted exactly where present


def test_cpu_engines_get_32_token_blocks_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's CPU default of 128 made the default student ≈7% slower (`CPU_BLOCK_SIZE`); GPUs keep vLLM's own."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_kwargs(Path("model"), VllmSettings())["block_size"] == 32
    assert engine_kwargs(Path("model"), VllmSettings(block_size=128))["block_size"] == 128
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_kwargs(Path("model"), VllmSettings())["block_size"] is None
    for refused in (16, 40, 48):  # vLLM's CPU attention takes multiples of 32 only ("No common block size")
        with pytest.raises(ValidationError, match="block_size"):
            VllmSettings(block_size=refused)
