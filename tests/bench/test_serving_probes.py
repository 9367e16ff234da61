"""`bench_model`'s choice of probes, with the serving process and the load generator replaced (no engine here)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.bench import serving as bench
from services.bench.serving import ServingBenchConfig, bench_model
from services.serving.loadtest import LoadtestConfig


class _Result:
    def __init__(self, config: LoadtestConfig) -> None:
        self.config = config
        self.streams: list[Any] = []

    def summary(self) -> dict[str, Any]:
        c = self.config.concurrency
        # Readers keep up to 8 streams; fixed-length streams report more tokens/s, so the test can tell them apart.
        return {"concurrency": c, "wpm_p50": 1000.0 if c <= 8 else 100.0, "wpm_p10": 0.0,
                "tokens_per_s": 10.0 * c + (0.5 if self.config.ignore_eos else 0.0),
                "tokens_per_s_steady": 12.0 * c if self.config.ignore_eos else None, "steady_from_s": 0.5,
                "ttft_ms_p50": 0.0,
                "itl_ms_p50": 0.0, "itl_ms_p99": 0.0, "failed": 0, "streams": c}  # fmt: skip


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[LoadtestConfig]:
    """Every load `bench_model` runs, in order, with no service and no load generator behind them."""
    recorded: list[LoadtestConfig] = []

    @contextlib.asynccontextmanager
    async def fake_process(env: dict[str, str], log: Path) -> AsyncIterator[str]:
        yield "127.0.0.1:1"

    async def fake_loadtest(config: LoadtestConfig) -> _Result:
        recorded.append(config)
        return _Result(config)

    monkeypatch.setattr(bench, "serving_process", fake_process)
    monkeypatch.setattr(bench, "run_loadtest", fake_loadtest)
    return recorded


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_capacity_probes_end_with_the_answer_and_tokens_per_s_are_fixed_length(
    stop_at_eos: bool, tmp_path: Path, calls: list[LoadtestConfig]
) -> None:
    config = ServingBenchConfig(home=tmp_path, probe_s=0.1, start_concurrency=2, max_concurrency=64,
                                capacity_stop_at_eos=stop_at_eos)  # fmt: skip
    out = asyncio.run(bench_model(config, "student", tmp_path / "model", budget_s=30.0, equal_at=4))
    assert out["streams_at_target"] == 8
    search = calls[:-1] if stop_at_eos else calls
    assert all(c.ignore_eos is not stop_at_eos for c in search)
    # Tokens/s at the equal concurrency always come from a fixed-length probe at that concurrency, its steady state.
    assert out["tokens_per_s_at_equal_concurrency"] == 48.0
    assert out["tokens_per_s_at_equal_concurrency_whole_probe"] == 40.5
    if stop_at_eos:
        assert calls[-1].concurrency == 4 and calls[-1].ignore_eos


def test_the_equal_concurrency_probe_runs_for_its_own_length(tmp_path: Path, calls: list[LoadtestConfig]) -> None:
    config = ServingBenchConfig(home=tmp_path, probe_s=0.1, equal_probe_s=7.0, start_concurrency=2, max_concurrency=64)
    out = asyncio.run(bench_model(config, "student", tmp_path / "model", budget_s=30.0, equal_at=4))
    # A capacity probe ran at 4 streams, fixed-length; the equal-concurrency figure still comes from its own probe.
    assert any(c.concurrency == 4 and c.duration_s == 0.1 for c in calls[:-1])
    assert (calls[-1].concurrency, calls[-1].duration_s, calls[-1].ignore_eos) == (4, 7.0, True)
    assert out["tokens_per_s_at_equal_concurrency"] == 48.0


def _folder(root: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = root / name
    folder.mkdir()
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return folder


def test_given_model_folders_are_checked_before_any_engine_starts(tmp_path: Path) -> None:
    from services.bench.serving import check_model_folders
    from services.common.models import ModelError

    empty = _folder(tmp_path, "empty", {})
    with pytest.raises(ModelError, match=r"student=.*empty: no config.json"):
        check_model_folders(ServingBenchConfig(home=tmp_path, student_dir=empty))
    pickled = _folder(tmp_path, "pickled", {"config.json": b"{}", "pytorch_model.bin": b"not safetensors"})
    with pytest.raises(ModelError, match=r"pytorch_model.bin.*only safetensors"):
        check_model_folders(ServingBenchConfig(home=tmp_path, teacher_dir=pickled))
    good = _folder(tmp_path, "good", {"config.json": b"{}", "model.safetensors": b""})
    check_model_folders(ServingBenchConfig(home=tmp_path, student_dir=good, teacher_dir=good))
