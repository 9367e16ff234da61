"""The trainer's device setting: auto, cpu, cuda, cuda:N, and clear errors naming the setting."""

from __future__ import annotations

import pytest
import torch

from services.trainer import device as dev


def _cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_and_cpu_on_a_machine_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 0)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device(" CPU ") == torch.device("cpu")
    assert dev.applies_cpu_settings(dev.resolve_device("auto"))
    assert dev.device_name(torch.device("cpu")).startswith("cpu (")
    dev.synchronize(torch.device("cpu"))  # nothing to wait for


@pytest.mark.parametrize("value", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_names_the_setting(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    _cuda(monkeypatch, 0)
    with pytest.raises(ValueError, match=rf"^DISTILLERY_TRAINER_DEVICE='{value}': .*CUDA.*use auto or cpu"):
        dev.resolve_device(value)


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cuda:-1", "mps", ""])
def test_unknown_values_name_the_setting(value: str) -> None:
    with pytest.raises(ValueError, match=r"^DISTILLERY_TRAINER_DEVICE=.*must be auto, cpu, cuda or cuda:N"):
        dev.resolve_device(value)


def test_cuda_values_where_torch_sees_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 2)
    assert dev.resolve_device("auto") == torch.device("cuda")
    assert dev.resolve_device("cuda") == torch.device("cuda")
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert not dev.applies_cpu_settings(dev.resolve_device("cuda:1"))
    with pytest.raises(ValueError, match=r"'cuda:2': there are 2 CUDA device\(s\)"):
        dev.resolve_device("cuda:2")


def test_bf16_is_fast_only_with_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common import cpu

    assert isinstance(cpu.cpu_flags(), frozenset)  # this machine's real /proc/cpuinfo parses
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not dev.bf16_is_fast(torch.device("cpu"))
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert dev.bf16_is_fast(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert dev.bf16_is_fast(torch.device("cuda"))
