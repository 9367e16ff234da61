"""Fuzzing every TeacherService RPC in-process with the real vLLM engine on the tiny Llama (the session's engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common import pb
from services.teacher.main import TeacherApp
from tests.fuzz import Rpc, fuzz
from tests.teacher.conftest import teacher_settings

SERVICE = "/distillery.teacher.v1.TeacherService/"
RPCS = [
    Rpc(SERVICE + "Generate", pb.teacher.GenerateRequest, streaming=True),
    Rpc(SERVICE + "Score", pb.teacher.ScoreRequest),
    Rpc(SERVICE + "GetModel", pb.teacher.GetModelRequest),
]


@pytest.fixture(scope="module")
async def app(
    teacher_engine: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TeacherApp]:
    settings = teacher_settings(tiny_model_dir, tmp_path_factory.mktemp("teacher-fuzz"), worker={"enabled": False})
    app = await TeacherApp.create(settings, engine=teacher_engine)
    await app.start()
    yield app
    await app.close()


async def _fuzz(app: TeacherApp, examples: int) -> None:
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        stub = pb.teacher_grpc.TeacherServiceStub(channel)

        async def normal() -> None:
            sampling = pb.common.SamplingParams(max_tokens=2)
            assert [c async for c in stub.Generate(pb.teacher.GenerateRequest(prompt="hi", sampling=sampling))]

        fuzzer = await fuzz(channel, RPCS, examples, normal)
    print(f"teacher fuzz: {fuzzer.examples} examples {fuzzer.codes}")


async def test_fuzz_every_teacher_rpc(app: TeacherApp) -> None:
    await _fuzz(app, 60)


@pytest.mark.slow
async def test_fuzz_every_teacher_rpc_long(app: TeacherApp) -> None:
    await _fuzz(app, 600)
