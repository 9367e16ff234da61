"""Longer serving tests (each starts its own engines): the in-place strategy, a swap to another architecture, and
the `distillery serving serve` process. Run with `make test-all`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import pb
from services.common.settings import KafkaSettings
from services.serving.settings import SwapSettings
from tests.serving.conftest import TinyModels, module_kafka, nan_weights, poll, register, serving_settings
from tests.serving.test_serving import collect, request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


async def test_in_place_strategy_drains_then_reloads(
    kafka_bootstrap: str, tiny_models: TinyModels, tmp_path: Path
) -> None:
    from services.serving.main import ServingApp

    settings = serving_settings(
        tmp_path, module_kafka(kafka_bootstrap), initial_model=str(tiny_models.v1), watch_checkpoints=False,
        swap=SwapSettings(strategy="in_place", warmup_tokens=4),
    )  # fmt: skip
    app = ServingApp(settings)
    await app.start(metrics_server=False)
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = pb.serving_grpc.ServingServiceStub(channel)
            assert (await stub.GetModel(pb.serving.GetModelRequest())).model.version == 0
            early = [asyncio.create_task(collect(stub, request(max_tokens=600))) for _ in range(4)]
            await poll(lambda: len(app.streams.open) == 4, 60, "4 open streams")
            new = register(app.registry, tiny_models.v2)
            swap = asyncio.ensure_future(stub.LoadModel(pb.serving.LoadModelRequest(registry_uri=new.uri)))
            await poll(lambda: not app.holder._open.is_set(), 30, "the gate to close")
            late = asyncio.create_task(collect(stub, request(max_tokens=8)))  # waits for the reload
            reply = await swap
            assert reply.model.version == new.version
            for chunks in await asyncio.gather(*early):
                assert {c.model_version for c in chunks} == {0}
            assert {c.model_version for c in await late} == {new.version}
            assert app.holder.standby is None and len({id(e) for e in app.holder.engines()}) == 1

            bad = register(app.registry, tiny_models.v3, mutate=nan_weights)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.LoadModel(pb.serving.LoadModelRequest(registry_uri=bad.uri))
            assert "warm-up failed" in err.value.details()
            chunks = await collect(stub, request(max_tokens=16))  # the restored weights serve, without NaNs
            assert {c.model_version for c in chunks} == {new.version}
            assert not app.fatal.done()
            probe = await app.holder.current.engine.probe(4)  # type: ignore[union-attr]
            assert not probe.problems(app.holder.current.engine.vocab_size)  # type: ignore[union-attr]
    finally:
        await app.stop()


async def test_other_architecture_starts_a_new_engine(
    kafka_bootstrap: str, tiny_models: TinyModels, tmp_path: Path
) -> None:
    from services.serving.main import ServingApp

    app = ServingApp(serving_settings(tmp_path, module_kafka(kafka_bootstrap), watch_checkpoints=False))
    v1 = register(app.registry, tiny_models.v1)
    await app.start(metrics_server=False)  # serves the promoted v1 found in the registry
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = pb.serving_grpc.ServingServiceStub(channel)
            assert (await stub.GetModel(pb.serving.GetModelRequest())).model.version == v1.version
            streams = [asyncio.create_task(collect(stub, request(max_tokens=600))) for _ in range(3)]
            await poll(lambda: len(app.streams.open) == 3, 60, "3 open streams")
            wide = register(app.registry, tiny_models.wide)
            reply = await stub.LoadModel(pb.serving.LoadModelRequest(registry_uri=wide.uri))
            assert reply.model.version == wide.version
            for chunks in await asyncio.gather(*streams):
                assert {c.model_version for c in chunks} == {v1.version}
            assert {c.model_version for c in await collect(stub, request(max_tokens=8))} == {wide.version}
            await app.swapper.wait_idle()
            assert app.holder.standby is not None and app.holder.standby.model.version == wide.version
            assert len(app.holder.engines()) == 2  # the v1 engines are gone
    finally:
        await app.stop()


async def test_serve_command_runs_until_sigterm(kafka_bootstrap: str, tiny_models: TinyModels, tmp_path: Path) -> None:
    kafka: KafkaSettings = module_kafka(kafka_bootstrap)
    env = {
        **os.environ,
        "DISTILLERY_HOME": str(tmp_path),
        "DISTILLERY_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DISTILLERY_KAFKA_TOPIC_CHECKPOINTS": kafka.topic_checkpoints,
        "DISTILLERY_SERVING_GRPC_PORT": "0",
        "DISTILLERY_SERVING_METRICS_PORT": "0",
        "DISTILLERY_SERVING_INITIAL_MODEL": str(tiny_models.v1),
        "DISTILLERY_SERVING_SWAP__STRATEGY": "engine",
        "DISTILLERY_SERVING_VLLM__ENFORCE_EAGER": "true",
        "DISTILLERY_SERVING_VLLM__KV_CACHE_GIB": "0.25",
        "DISTILLERY_SERVING_VLLM__MAX_MODEL_LEN": "1024",
        "DISTILLERY_SERVING_LOG_FORMAT": "json",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "serving", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    address = None
    log: list[str] = []
    try:
        deadline = time.monotonic() + 300
        assert proc.stderr is not None
        while address is None and time.monotonic() < deadline:
            line = (await asyncio.wait_for(proc.stderr.readline(), 300)).decode()
            assert line, "the service exited: " + "".join(log[-20:])
            log.append(line)
            if '"serving serving"' in line and '"grpc": "' in line:
                address = line.split('"grpc": "')[1].split('"')[0]
        assert address is not None
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            await poll(serving, 300, "SERVING", interval_s=0.5)
            stub = pb.serving_grpc.ServingServiceStub(channel)
            assert (await stub.GetModel(pb.serving.GetModelRequest())).model.version == 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 120) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_exits_non_zero_when_its_engine_dies(
    kafka_bootstrap: str, tiny_models: TinyModels, tmp_path: Path
) -> None:
    import psutil

    from services.serving.process import serving_process

    env = {
        "DISTILLERY_HOME": str(tmp_path),
        "DISTILLERY_SERVING_INITIAL_MODEL": str(tiny_models.v1),
        "DISTILLERY_SERVING_WATCH_CHECKPOINTS": "false",
        "DISTILLERY_SERVING_SWAP__STRATEGY": "engine",
        "DISTILLERY_SERVING_VLLM__ENFORCE_EAGER": "true",
        "DISTILLERY_SERVING_VLLM__KV_CACHE_GIB": "0.25",
        "DISTILLERY_SERVING_VLLM__MAX_MODEL_LEN": "1024",
    }
    async with serving_process(env, tmp_path / "serve.log", return_process=True) as (_, service_process):
        proc = service_process.proc
        service = psutil.Process(proc.pid)
        engine_core = next(
            p for p in service.children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()
        )
        engine_core.kill()  # a process our service started, found by its PID
        code = await asyncio.to_thread(proc.wait, 120)
    assert code != 0
    assert "EngineDied" in (tmp_path / "serve.log").read_text() or "died" in (tmp_path / "serve.log").read_text()
