"""Teacher process: engine + gRPC service + pipeline worker, started together and stopped gracefully.

`run(settings)` is `distillery teacher serve`. `TeacherApp` is the same thing for in-process use (tests, bench):
`app = await TeacherApp.create(settings); await app.start(); ...; await app.close()`.
A dead engine or a failed worker completes `app.fatal` with the error: `run` then drains and raises, so the
process exits non-zero and its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path

from services.common import pb
from services.common.grpc_server import GrpcServer
from services.common.kafka import ensure_topics
from services.common.kafka_health import KafkaHealth
from services.common.logs import setup_logging
from services.common.models import parameter_count, resolve_model
from services.common.prompt_size import PromptSize
from services.common.registry import sha256_file
from services.teacher import metrics
from services.teacher.engine import TeacherEngine, VllmTeacherEngine
from services.teacher.sampling import Limits
from services.teacher.servicer import TeacherServicer
from services.teacher.settings import TeacherSettings
from services.teacher.worker import PromptWorker

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.teacher.DESCRIPTOR.services_by_name["TeacherService"].full_name
MANIFESTS = ("distillery-model.json", "manifest.json")


def model_revision(folder: Path) -> str:
    """A short content hash of a model folder: its manifest's sha256 when it has one, else of its weights."""
    for name in MANIFESTS:
        if (folder / name).is_file():
            return sha256_file(folder / name)[:16]
    digest = hashlib.sha256()
    for file in sorted([*folder.glob("*.safetensors"), *folder.glob("config.json"), *folder.glob("tokenizer.json")]):
        digest.update(f"{file.name}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()[:16]


def model_name(model: str) -> str:
    """What samples record as the teacher: the prepared name, or a folder's own name (never a local path)."""
    return Path(model).name if Path(model).is_dir() else model


def limits_for(engine: TeacherEngine, settings: TeacherSettings) -> Limits:
    info = engine.info
    return Limits(
        max_model_len=info.max_model_len,
        max_logprobs=info.max_logprobs,
        vocab_size=info.vocab_size,
        max_n=settings.max_n,
        default_top_k=min(settings.default_top_k, info.max_logprobs),
        default_max_tokens=settings.default_max_tokens,
        default_temperature=settings.default_temperature,
        prompt_size=PromptSize(settings.max_prompt_chars, settings.max_prompt_bytes),
    )


async def start_engine(settings: TeacherSettings) -> VllmTeacherEngine:
    folder = resolve_model(settings.model, settings.models)
    return await VllmTeacherEngine.start(
        folder,
        settings.vllm,
        name=model_name(settings.model),
        revision=settings.revision or model_revision(folder),
        parameter_count=parameter_count(folder),
    )


class TeacherApp:
    def __init__(self, settings: TeacherSettings, engine: TeacherEngine, *, own_engine: bool = True) -> None:
        self.settings = settings
        self.engine = engine
        self.own_engine = own_engine
        self.limits = limits_for(engine, settings)
        self.servicer = TeacherServicer(engine, self.limits, settings.max_concurrent_streams)
        self.server = GrpcServer("teacher", settings)
        pb.teacher_grpc.add_TeacherServiceServicer_to_server(self.servicer, self.server.server)
        self.server.add_service_name(SERVICE_NAME)
        self.worker = PromptWorker(engine, settings, self.limits) if settings.worker.enabled else None
        self.fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def create(cls, settings: TeacherSettings, engine: TeacherEngine | None = None) -> TeacherApp:
        """Starts an engine from the settings unless one is given (a given engine is not shut down by `close`)."""
        if engine is not None:
            return cls(settings, engine, own_engine=False)
        return cls(settings, await start_engine(settings))

    async def start(self, *, metrics_server: bool = True) -> int:
        """Creates the topics, starts gRPC (+ /metrics) and the worker; returns the gRPC port."""
        if self.worker is not None:
            await asyncio.to_thread(ensure_topics, self.settings.kafka)
        port = await self.server.start(metrics=metrics_server)
        self.engine.dead.add_done_callback(self._engine_done)
        worker = self.worker
        lag = (lambda: worker.lag) if worker is not None else None
        self._tasks.append(asyncio.create_task(metrics.run_sampler(self.engine, lag), name="teacher-metrics"))
        if worker is not None:
            # The worker is what needs Kafka: without it the teacher's health follows the engine only.
            self.kafka_health = KafkaHealth(
                self.settings.kafka, self.server.set_serving, self.settings.kafka_unavailable_s,
                self.settings.kafka_check_interval_s,
            )  # fmt: skip
            self._tasks.append(asyncio.create_task(self.kafka_health.run(), name="teacher-kafka-health"))
            task = asyncio.create_task(worker.run(), name="teacher-worker")
            task.add_done_callback(self._worker_done)
            self._tasks.append(task)
        return port

    def _engine_done(self, dead: asyncio.Future[None]) -> None:
        if not self.fatal.done() and not dead.cancelled():
            self.fatal.set_exception(dead.exception() or RuntimeError("the engine stopped"))

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.fatal.done():
            return
        if task.exception() is not None:
            self.fatal.set_exception(task.exception())  # type: ignore[arg-type]

    async def close(self) -> None:
        """Stops the worker (lets in-flight prompts finish within the grace period), the server and the engine."""
        if self.worker is not None:
            self.worker.stop()
        for task in self._tasks:
            if task.get_name() != "teacher-worker":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.server.stop(grace=0)
        if self.own_engine:
            await self.engine.shutdown()


async def run(settings: TeacherSettings) -> None:
    """`distillery teacher serve`: runs until SIGTERM/SIGINT; raises when the engine or the worker dies."""
    setup_logging("teacher", settings.log_level, settings.log_format)
    app = await TeacherApp.create(settings)
    try:
        await app.start()
    except BaseException:
        await app.close()
        raise
    logger.info(
        "teacher ready",
        extra={"grpc": app.server.address, "metrics_port": app.server.metrics_port, "model": app.engine.info.name},
    )
    await app.server.serve_until_signal(cleanup=app.close, fatal=app.fatal)
