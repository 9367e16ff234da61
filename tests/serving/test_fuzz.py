"""Fuzzing every ServingService RPC in-process: the real servicer, swapper and a real vLLM engine serving the tiny
Llama as its initial model (no Kafka: the checkpoint watcher is off; one engine: swap strategy in_place)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common import pb
from services.serving.settings import LimitSettings, ServingSettings, SwapSettings
from tests.fuzz import Rpc, fuzz
from tests.serving.conftest import TEST_VLLM

SERVICE = "/distillery.serving.v1.ServingService/"
RPCS = [
    Rpc(SERVICE + "Generate", pb.serving.GenerateRequest, streaming=True),
    Rpc(SERVICE + "GetModel", pb.serving.GetModelRequest),
    Rpc(SERVICE + "LoadModel", pb.serving.LoadModelRequest),
]


@pytest.fixture(scope="module")
async def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    from services.serving.main import ServingApp

    settings = ServingSettings(
        home=tmp_path_factory.mktemp("serving-fuzz"), grpc_port=0, metrics_port=0, watch_checkpoints=False,
        initial_model=str(tiny_model_dir), vllm=TEST_VLLM, swap=SwapSettings(strategy="in_place", warmup_tokens=4),
        limits=LimitSettings(max_prompt_tokens=256, max_tokens=512), grace_period_s=1.0,
    )  # fmt: skip
    app = ServingApp(settings)
    await app.start(metrics_server=False)
    yield app
    await app.stop()


async def _fuzz(app: Any, examples: int) -> None:
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = pb.serving_grpc.ServingServiceStub(channel)

        async def normal() -> None:
            sampling = pb.common.SamplingParams(max_tokens=2)
            assert [c async for c in stub.Generate(pb.serving.GenerateRequest(prompt="hi", sampling=sampling))]

        fuzzer = await fuzz(channel, RPCS, examples, normal)
    print(f"serving fuzz: {fuzzer.examples} examples {fuzzer.codes}")


async def test_fuzz_every_serving_rpc(app: Any) -> None:
    await _fuzz(app, 60)


@pytest.mark.slow
async def test_fuzz_every_serving_rpc_long(app: Any) -> None:
    await _fuzz(app, 600)
