"""Swap logic on fake engines (unit tests of swap.py + holder.py): which path a swap takes, drains, refusals.

Engines here are fakes that record calls; the real vLLM path is covered by test_serving.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from services.common.errors import Unavailable
from services.serving.engine import Chunk, Probe, Sampling
from services.serving.holder import EngineHolder
from services.serving.model import ModelInfo
from services.serving.settings import SwapSettings
from services.serving.swap import SwapIgnored, Swapper, SwapRefused


class FakeEngine:
    def __init__(self, path: Path, log: list[str]) -> None:
        self.model_dir = path
        self.log = log
        self.stopped = False
        self.errored = False
        self.bad = False
        self.release = asyncio.Event()
        log.append(f"start {path.name}")

    max_model_len = 512
    vocab_size = 100

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        return [1, 2, 3]

    def encode_text(self, text: str) -> list[int]:
        return [1, 2]

    async def generate(
        self, prompt_ids: list[int], sampling: Sampling, request_id: str, interval_s: float = 0.0
    ) -> AsyncIterator[Chunk]:
        yield Chunk("a ", [5], 3, 1)
        await self.release.wait()
        yield Chunk("b", [6], 3, 2, "length")

    async def reload(self, model_dir: Path) -> None:
        self.log.append(f"reload {self.model_dir.name}->{model_dir.name}")
        self.model_dir = model_dir

    async def probe(self, max_tokens: int) -> Probe:
        nan = "nan" in self.model_dir.name
        return Probe([1] * max_tokens, [float("nan") if nan else -0.5] * max_tokens, 0.0)

    async def clear_cache(self) -> None:
        self.log.append(f"clear {self.model_dir.name}")

    def num_unfinished(self) -> int:
        return 0

    async def abort_all(self) -> None:
        self.release.set()

    async def shutdown(self) -> None:
        self.stopped = True
        self.log.append(f"stop {self.model_dir.name}")


def model(version: int, arch: str = "a", name: str | None = None) -> ModelInfo:
    name = name or f"v{version}"
    return ModelInfo(version=version, name=name, path=Path(name), fingerprint=arch)


def make(strategy: str = "standby") -> tuple[EngineHolder, Swapper, list[str]]:
    log: list[str] = []

    async def factory(path: Path) -> FakeEngine:
        await asyncio.sleep(0)
        return FakeEngine(path, log)

    holder = EngineHolder()
    return holder, Swapper(holder, factory, SwapSettings(strategy=strategy, drain_timeout_s=5)), log  # type: ignore[arg-type]


async def test_no_model_means_unavailable() -> None:
    holder, _, _ = make()
    with pytest.raises(Unavailable):
        async with holder.lease():
            pass


async def test_standby_reload_keeps_streams_on_their_version() -> None:
    holder, swapper, log = make()
    await swapper.start_initial(model(1))
    await swapper.wait_idle()
    assert log == ["start v1", "start v1"]  # serving engine + standby
    assert holder.standby is not None

    async def stream() -> list[int]:
        versions = []
        async with holder.lease() as slot:
            async for _ in slot.engine.generate([1], Sampling(max_tokens=2), "r"):
                versions.append(slot.model.version)
        return versions

    old_slot = holder.current
    task = asyncio.create_task(stream())
    await asyncio.sleep(0.01)
    result = await swapper.swap_to(model(2))
    assert result.path == "reload"
    assert log[-1] == "reload v1->v2"
    assert holder.model and holder.model.version == 2
    assert old_slot in holder.retiring  # still finishing its stream
    old_slot.engine.release.set()  # type: ignore[attr-defined]
    assert await task == [1, 1]
    await swapper.wait_idle()
    assert holder.standby is old_slot and not holder.retiring  # the drained engine is the next standby
    await swapper.swap_to(model(3))
    assert log[-1] == "reload v1->v3"
    assert not any(line.startswith("stop") for line in log)


async def test_older_versions_are_ignored_unless_allowed() -> None:
    holder, swapper, _ = make()
    await swapper.start_initial(model(5))
    with pytest.raises(SwapIgnored):
        await swapper.swap_to(model(5))
    with pytest.raises(SwapIgnored):
        await swapper.swap_to(model(3))
    await swapper.swap_to(model(3), allow_older=True)
    assert holder.model and holder.model.version == 3


async def test_failed_warmup_leaves_the_old_version_serving() -> None:
    holder, swapper, _ = make()
    await swapper.start_initial(model(1))
    await swapper.wait_idle()
    with pytest.raises(SwapRefused, match=r"warm-up failed.*not finite"):
        await swapper.swap_to(model(2, name="v2-nan"))
    assert holder.model and holder.model.version == 1
    assert holder.standby is not None  # parked; the next reload replaces its weights
    await swapper.swap_to(model(3))
    assert holder.model.version == 3


async def test_other_architecture_gets_a_new_engine_and_stops_the_old_ones() -> None:
    holder, swapper, log = make()
    await swapper.start_initial(model(1))
    await swapper.wait_idle()
    result = await swapper.swap_to(model(2, arch="b"))
    assert result.path == "engine"
    await swapper.wait_idle()
    assert log.count("stop v1") == 2  # the old serving engine and the old standby
    assert holder.standby is not None and holder.standby.model.fingerprint == "b"


async def test_engine_strategy_never_keeps_a_standby() -> None:
    holder, swapper, log = make("engine")
    await swapper.start_initial(model(1))
    await swapper.swap_to(model(2))
    await swapper.wait_idle()
    assert log == ["start v1", "start v2", "stop v1"]
    assert holder.standby is None


async def test_in_place_waits_for_streams_then_reloads() -> None:
    holder, swapper, log = make("in_place")
    await swapper.start_initial(model(1))
    entered = asyncio.Event()

    async def stream() -> int:
        async with holder.lease() as slot:
            entered.set()
            async for _ in slot.engine.generate([1], Sampling(max_tokens=2), "r"):
                pass
            return slot.model.version

    first = asyncio.create_task(stream())
    await entered.wait()
    swap = asyncio.create_task(swapper.swap_to(model(2)))
    await asyncio.sleep(0.01)
    late = asyncio.create_task(stream())  # waits at the gate while the swap drains
    await asyncio.sleep(0.01)
    assert not swap.done() and not late.done()
    holder.current.engine.release.set()  # type: ignore[union-attr,attr-defined]
    assert await first == 1
    await swap
    assert await late == 2
    assert log == ["start v1", "reload v1->v2"]
