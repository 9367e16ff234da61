"""What the CPU can do fast: native bf16 arithmetic or not (it decides the engines' dtype and the trainer's autocast).

Measured on a 2-core AVX2 AMD EPYC (no AVX512-BF16): the default teacher in vLLM generated 138 tokens/s in float32
and 29 in bfloat16 (32 streams × 48 tokens, eager), and a (640, 128) @ (128, 4096) matmul took 35 ms in float32 and
1,750 ms in bfloat16: without native instructions torch and vLLM emulate bf16. On AVX512-BF16 / AMX machines bf16
is the faster one (PLATFORM.md's measurements).
"""

from __future__ import annotations

import functools
from pathlib import Path

#: CPU feature flags of native bf16 matrix arithmetic: x86 AVX512-BF16 and AMX, Arm's BF16 extension.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (else bf16 is emulated and several times slower than float32)."""
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def enable_amx() -> bool:
    """Asks Linux for this process's permission to use AMX tiles (arch_prctl ARCH_REQ_XCOMP_PERM), where the CPU has
    them; True when granted. Without it the first AMX instruction is SIGILL: vLLM's CPU attention kernel on AMX
    machines uses tiles but never asks (oneDNN asks only for its own matmuls, so whether a process had permission
    depended on what ran first in it). Idempotent, and a no-op elsewhere."""
    if "amx_tile" not in cpu_flags():
        return False
    import torch

    init = getattr(torch._C._cpu, "_init_amx", None)
    return bool(init()) if init is not None else False
