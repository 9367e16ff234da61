"""Serving fixtures: tiny Llamas registered as real registry checkpoints, and one in-process service per module.

Engine starts take tens of seconds on CPU, so the service (and its engines) is shared by a module's tests.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from services.common import pb
from services.common.kafka import ProtoProducer
from services.common.registry import Checkpoint, Registry
from services.common.settings import KafkaSettings
from services.common.vllm_engine import VllmSettings
from services.serving.settings import LimitSettings, ServingSettings, SwapSettings

TEST_VLLM = VllmSettings(kv_cache_gib=0.25, max_model_len=1024, max_num_seqs=64, enforce_eager=True)


@dataclass(frozen=True)
class TinyModels:
    """Random tiny Llamas with identical architecture and tokenizer, different weights."""

    v1: Path
    v2: Path
    v3: Path
    wide: Path  # another architecture


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    from services.common.tiny import build_llama

    root = tmp_path_factory.mktemp("serving-tiny")
    return TinyModels(
        v1=build_llama(root / "v1", seed=1),
        v2=build_llama(root / "v2", seed=2),
        v3=build_llama(root / "v3", seed=3),
        wide=build_llama(root / "wide", seed=4, hidden_size=192, num_heads=3),
    )


def register(
    registry: Registry, source: Path, *, promote: bool = True, mutate: Callable[[Path], None] | None = None
) -> Checkpoint:
    """Copies a model folder into the registry as a new checkpoint; `mutate` edits the staged files first."""
    staged = registry.staging_dir()
    for file in source.iterdir():
        shutil.copy(file, staged / file.name)
    if mutate is not None:
        mutate(staged)
    ckpt = registry.write(staged, run_id="test-run", step=ckpt_step(), parameter_count=1, metrics={"accuracy": 0.5})
    if promote:
        registry.promote(ckpt)
    return ckpt


_steps = iter(range(1, 1_000_000))


def ckpt_step() -> int:
    return next(_steps)


def nan_weights(folder: Path) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    name = next(k for k in weights if "mlp.down_proj" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def event_for(ckpt: Checkpoint, promoted: bool = True) -> pb.common.CheckpointEvent:
    return pb.common.CheckpointEvent(
        run_id=ckpt.manifest.run_id,
        version=ckpt.version,
        registry_uri=ckpt.uri,
        manifest_sha256=ckpt.manifest_sha256,
        parameter_count=ckpt.manifest.parameter_count,
        promoted=promoted,
        step=ckpt.manifest.step,
    )


async def poll(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Polls an (async or plain) check until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


@dataclass
class Served:
    app: Any
    registry: Registry
    kafka: KafkaSettings
    producer: ProtoProducer
    channel: grpc.aio.Channel
    stub: Any
    health: Any
    v1: Checkpoint
    before_first: dict[str, Any]

    async def version(self) -> int:
        reply = await self.stub.GetModel(pb.serving.GetModelRequest())
        return int(reply.model.version)

    def publish(self, event: pb.common.CheckpointEvent) -> None:
        self.producer.send(self.kafka.topic_checkpoints, event.run_id, event).get(timeout=30)

    async def wait_version(self, version: int, timeout_s: float = 300) -> None:
        async def at() -> bool:
            try:
                return await self.version() == version
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: nothing served yet
                    raise
                return False

        await poll(at, timeout_s, f"version {version}")


def serving_settings(home: Path, kafka: KafkaSettings, **overrides: Any) -> ServingSettings:
    fields: dict[str, Any] = dict(
        home=home,
        grpc_port=0,
        metrics_port=0,
        kafka=kafka,
        vllm=TEST_VLLM,
        limits=LimitSettings(max_concurrent_streams=48, max_prompt_tokens=256, max_tokens=960),
        swap=SwapSettings(warmup_tokens=4, drain_timeout_s=120),
        grace_period_s=1.0,
    )
    fields.update(overrides)
    return ServingSettings(**fields)


def module_kafka(bootstrap: str) -> KafkaSettings:
    suffix = uuid.uuid4().hex[:8]
    return KafkaSettings(
        bootstrap=bootstrap,
        partitions=1,
        topic_prompts=f"test.{suffix}.prompts",
        topic_teacher_samples=f"test.{suffix}.teacher-samples",
        topic_checkpoints=f"test.{suffix}.checkpoints",
        topic_dead_letters=f"test.{suffix}.dead-letters",
    )


@pytest.fixture(scope="module")
async def served(
    kafka_bootstrap: str, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    """A service that started with an empty registry, then served v1 after its promotion event."""
    from services.serving.main import ServingApp

    kafka = module_kafka(kafka_bootstrap)
    app = ServingApp(serving_settings(tmp_path_factory.mktemp("serving-home"), kafka))
    await app.start(metrics_server=True)
    channel = grpc.aio.insecure_channel(app.address)
    stub = pb.serving_grpc.ServingServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    before: dict[str, Any] = {
        "health": (await health.Check(health_pb2.HealthCheckRequest(service=""))).status,
    }
    for name, call in (
        ("get_model", stub.GetModel(pb.serving.GetModelRequest())),
        ("generate", _drain(stub.Generate(pb.serving.GenerateRequest(prompt="hi")))),
    ):
        try:
            await call
            before[name] = "OK"
        except grpc.aio.AioRpcError as exc:
            before[name] = exc.code()
    producer = ProtoProducer(kafka, "serving-test")
    v1 = register(app.registry, tiny_models.v1)
    result = Served(app, app.registry, kafka, producer, channel, stub, health, v1, before)
    result.publish(event_for(v1))
    await result.wait_version(v1.version, timeout_s=600)  # an engine start: minutes on a busy machine
    try:
        yield result
    finally:
        producer.close()
        await channel.close()
        await app.stop()


async def _drain(call: Any) -> None:
    async for _ in call:
        pass
