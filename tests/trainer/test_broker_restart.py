"""A broker kill -9 and restart on the same port, under a running trainer process's clients (in-process app, its own
broker): health goes NOT_SERVING while Kafka is gone and SERVING again after, missing topics are recreated, and the
producer — left failing when the broker lost its producer ids (tansu in memory) — is rebuilt so sends succeed. On the
durable default broker (tansu-s3) the records acknowledged before the kill are still there after it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import broker, pb
from services.common.kafka import ProtoConsumer, ensure_topics
from services.common.settings import KafkaSettings
from services.trainer.main import TrainerApp
from tests.trainer.conftest import trainer_settings

# The one fast representative of broker faults (≈10 s): in the default suite.
pytestmark = pytest.mark.timeout(240)

N = 40


async def _health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=2)
        return int(reply.status)


async def _poll_health(address: str, want: int, timeout_s: float) -> float:
    started = time.monotonic()
    while await _health(address) != want:
        assert time.monotonic() - started < timeout_s, f"health never became {want}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def _kill9(state: broker.BrokerState) -> None:
    os.kill(state.pid, signal.SIGKILL)
    os.waitpid(state.pid, 0)  # our child: reap it so the port is free


def _read_all(kafka: KafkaSettings, topic: str, want: int, timeout_s: float = 30) -> list[Any]:
    consumer = ProtoConsumer(kafka, topic, pb.common.CheckpointEvent, f"reader-{uuid.uuid4().hex}", "reader")
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < want and time.monotonic() < deadline:
            got += [r.value for r in consumer.poll(0.5) if r.value is not None]
        got += [r.value for r in consumer.poll(1.0) if r.value is not None]  # duplicates arrive after the last one
    finally:
        consumer.close()
    return got


async def test_broker_kill_and_restart(tiny_teacher: Path, tmp_path: Path) -> None:
    home = tmp_path / "broker"
    state = broker.start(home)
    kafka = KafkaSettings(bootstrap=state.bootstrap, partitions=2)
    settings = trainer_settings(
        tiny_teacher, tmp_path / "home", kafka, kafka_unavailable_s=1.5, kafka_check_interval_s=0.3,
        announce_timeout_s=60,
    )  # fmt: skip
    app = await TrainerApp.create(settings)
    await app.start(metrics_server=False)
    topic = kafka.topic_checkpoints
    try:
        assert await _health(app.server.address) == health_pb2.HealthCheckResponse.SERVING
        for v in range(1, N // 2 + 1):
            await asyncio.to_thread(app.producer.send_and_wait, topic, "r", pb.common.CheckpointEvent(version=v))

        _kill9(state)
        down_s = await _poll_health(app.server.address, health_pb2.HealthCheckResponse.NOT_SERVING, 30)
        # Liveness stays SERVING: a broker outage takes the trainer out of rotation, it does not get it restarted.
        assert await _health(app.server.address, "liveness") == health_pb2.HealthCheckResponse.SERVING
        # Sends while the broker is down wait (and rebuild the producer) until it is back.
        send = app.producer.send_and_wait
        events = [pb.common.CheckpointEvent(version=v) for v in range(N // 2 + 1, N + 1)]
        pending = [asyncio.create_task(asyncio.to_thread(send, topic, "r", ev, None, 60.0)) for ev in events]
        await asyncio.sleep(0)
        state = broker.start(home, port=state.port)
        up_s = await _poll_health(app.server.address, health_pb2.HealthCheckResponse.SERVING, 30)
        await asyncio.wait_for(asyncio.gather(*pending), 90)
        # Every topic is back (recreated by the health check, or auto-created by a send that got there first).
        assert await asyncio.to_thread(ensure_topics, kafka) == []
        got = await asyncio.to_thread(_read_all, kafka, topic, N // 2)
        after = [e.version for e in got if e.version > N // 2]
        before = [e.version for e in got if e.version <= N // 2]
        print(  # the figures for the fault report (pytest -s)
            f"\nbroker restart: NOT_SERVING after {down_s:.1f}s, SERVING {up_s:.1f}s after restart; "
            f"acked before kill {N // 2}, still readable {len(set(before))}; sent across the restart {N // 2}, "
            f"readable {len(set(after))}, duplicates {len(after) - len(set(after))}; "
            f"producer rebuilds {app.producer.rebuilds}; topics recreated {app.kafka_health.recreated}"
        )
        assert sorted(set(after)) == list(range(N // 2 + 1, N + 1))  # nothing sent across the restart is lost
        if state.engine == "tansu-s3":  # a durable broker (the default) also kept what it had acknowledged
            assert sorted(set(before)) == list(range(1, N // 2 + 1))
    finally:
        await app.close()
        broker.stop(home)
