"""Where the trainer computes: the `device` setting ("auto", "cpu", "cuda", "cuda:N") as a torch device."""

from __future__ import annotations

import re

import torch

from services.common.cpu import native_bf16

SETTING = "DISTILLERY_TRAINER_DEVICE"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(setting: str) -> torch.device:
    """The device a setting names: auto (CUDA when torch sees a GPU, else CPU), cpu, cuda (the current GPU), cuda:N.

    Raises ValueError naming the setting and its value for anything else, and for CUDA where there is none (a
    trainer asked for a GPU should fail at start-up, not train on the CPU for hours unnoticed).
    """
    value = setting.strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(value)
    if match is None:
        raise ValueError(f"{SETTING}={setting!r}: must be auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise ValueError(f"{SETTING}={setting!r}: {why} (torch {torch.__version__}); use auto or cpu")
    if match.group(1) is None:
        return torch.device("cuda")
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"{SETTING}={setting!r}: there are {count} CUDA device(s), numbered from 0")
    return torch.device("cuda", index)


def applies_cpu_settings(device: torch.device) -> bool:
    """Whether thread counts and core pinning (torch_threads, cpu_bind) apply: only when training on the CPU.

    On CUDA the host threads only feed the GPU; pinning them to a core or two would starve the data path.
    """
    return device.type == "cpu"


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up on `device` rather than slowing it down.

    CUDA: GPUs with bf16 arithmetic (Ampere and later). CPU: only with native bf16 matrix instructions (x86
    AVX512-BF16 or AMX, Arm BF16); without them torch emulates bf16 matmuls — on a 2-core AVX2 AMD EPYC a
    (640, 128) @ (128, 4096) matmul took 1,750 ms in bf16 against 35 ms in float32.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and native_bf16()


def device_name(device: torch.device) -> str:
    """A human-readable name for logs and reports, e.g. "cuda:0 (NVIDIA H200)" or "cpu (2 threads)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'s' if threads != 1 else ''})"


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA kernels run asynchronously), so a timer measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank_device(setting: str, rank: int, world: int) -> torch.device:
    """The device of data-parallel rank `rank` of `world`: the setting's, except that on CUDA each rank of a
    multi-rank run takes its own GPU, cuda:RANK (NCCL refuses two ranks on one device).

    Raises ValueError naming the setting for an explicit cuda:N with world > 1, or fewer GPUs than ranks.
    """
    device = resolve_device(setting)
    if world == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"{SETTING}={setting!r}: with world_size {world} each rank takes its own GPU (cuda:RANK); "
                         "use auto or cuda")  # fmt: skip
    count = torch.cuda.device_count()
    if world > count:
        raise ValueError(f"{SETTING}={setting!r}: world_size {world} needs {world} GPUs, this machine has {count}")
    return torch.device("cuda", rank)
