"""Trainer process: run manager + gRPC service; unfinished runs resume at start, SIGTERM checkpoints then exits.

`run(settings)` is `distillery trainer serve`. `TrainerApp` is the same thing for in-process use (tests):
`app = await TrainerApp.create(settings); port = await app.start(); ...; await app.close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from services.common import pb
from services.common.grpc_server import GrpcServer
from services.common.kafka import ProtoProducer, ensure_topics
from services.common.kafka_health import KafkaHealth
from services.common.logs import setup_logging
from services.common.models import resolve_model
from services.common.registry import Registry
from services.common.settings import cpu_list
from services.trainer.device import resolve_device
from services.trainer.loop import torch_threads
from services.trainer.runs import RunManager
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.trainer.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerApp:
    def __init__(self, settings: TrainerSettings, teacher_dir: Path) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry)
        self.producer = ProtoProducer(settings.kafka, "trainer")
        self.manager = RunManager(settings, teacher_dir, self.registry, self.producer)
        self.servicer = TrainerServicer(self.manager, self.registry, self.producer, settings.kafka.topic_checkpoints)
        self.server = GrpcServer("trainer", settings)
        pb.trainer_grpc.add_TrainerServiceServicer_to_server(self.servicer, self.server.server)
        self.server.add_service_name(SERVICE_NAME)
        self.fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.kafka_health = KafkaHealth(
            settings.kafka, self.server.set_serving, settings.kafka_unavailable_s, settings.kafka_check_interval_s
        )
        self._health_task: asyncio.Task[None] | None = None

    @classmethod
    async def create(cls, settings: TrainerSettings) -> TrainerApp:
        """Resolves the teacher folder (preparing the default teacher on first use) and creates the topics."""
        import torch

        if resolve_device(settings.device).type == "cpu":
            torch.set_num_threads(torch_threads(settings.torch_threads))
        teacher_dir = await asyncio.to_thread(resolve_model, settings.teacher_model, settings.models)
        await asyncio.to_thread(ensure_topics, settings.kafka)
        return cls(settings, teacher_dir)

    async def start(self, *, metrics_server: bool = True) -> int:
        """Starts gRPC (+ /metrics), then resumes unfinished runs; returns the gRPC port."""
        # The trainer is the registry's only writer: folders left in tmp/ are from a writer that died.
        await asyncio.to_thread(self.registry.discard_staging)
        port = await self.server.start(metrics=metrics_server)
        self._health_task = asyncio.create_task(self.kafka_health.run(), name="trainer-kafka-health")
        resumed = await asyncio.to_thread(self.manager.load_persisted)
        if resumed:
            logger.info("resuming runs", extra={"runs": resumed})
        return port

    async def close(self) -> None:
        """Stops the active run after a checkpoint (it resumes at the next start), then the server."""
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(BaseException):
                await self._health_task
        await asyncio.to_thread(self.manager.shutdown, max(self.settings.grace_period_s, 1.0) * 6)
        await self.server.stop(grace=0)
        await asyncio.to_thread(self.producer.close)


async def run(settings: TrainerSettings) -> None:
    """`distillery trainer serve`: runs until SIGTERM/SIGINT."""
    setup_logging("trainer", settings.log_level, settings.log_format)
    if settings.cpu_bind and resolve_device(settings.device).type == "cpu":
        # Before torch starts its thread pool and the intake and gRPC threads start: they inherit the affinity.
        try:
            os.sched_setaffinity(0, cpu_list(settings.cpu_bind))
        except OSError as exc:
            allowed = sorted(os.sched_getaffinity(0))
            raise ValueError(f"cpu_bind={settings.cpu_bind!r}: not cores this process may use {allowed}") from exc
        logger.info("pinned", extra={"cpus": sorted(os.sched_getaffinity(0))})
    app = await TrainerApp.create(settings)
    try:
        await app.start()
    except BaseException:
        await app.close()
        raise
    logger.info("trainer ready", extra={"grpc": app.server.address, "metrics_port": app.server.metrics_port})
    await app.server.serve_until_signal(cleanup=app.close, fatal=app.fatal)
