"""The serving process: gRPC server, engine holder, checkpoint watcher, engine monitor; graceful stop.

`ServingApp` is what tests build in-process (port 0); `run(settings)` is `distillery serving serve`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from services.common import pb
from services.common.errors import FailedPrecondition
from services.common.grpc_server import GrpcServer
from services.common.kafka import ensure_topics
from services.common.logs import setup_logging
from services.common.models import check_safe_folder, parameter_count, resolve_model
from services.common.registry import CheckpointError, Registry, checkpoint_id_of
from services.serving import metrics
from services.serving.engine import EngineFactory, VllmEngine
from services.serving.holder import EngineHolder
from services.serving.model import ModelInfo
from services.serving.servicer import ServingServicer
from services.serving.settings import ServingSettings
from services.serving.streams import StreamService
from services.serving.swap import Swapper, SwapRefused, load_checkpoint
from services.serving.watcher import CheckpointWatcher

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.serving.DESCRIPTOR.services_by_name["ServingService"].full_name


class EngineDied(RuntimeError):
    """The engine serving new streams stopped working: the process exits so the orchestrator restarts it."""


class ServingApp:
    def __init__(self, settings: ServingSettings, factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry)
        self.holder = EngineHolder(on_change=self._on_model_change)
        self.swapper = Swapper(
            self.holder, factory or VllmEngine.factory(settings.engine_settings()), settings.swap, on_fatal=self._fail
        )
        self.streams = StreamService(self.holder, settings.limits, settings.stream_interval_ms / 1000)
        self.server = GrpcServer("serving", settings)
        pb.serving_grpc.add_ServingServiceServicer_to_server(
            ServingServicer(self.streams, self.swapper, self.registry), self.server.server
        )
        self.server.add_service_name(SERVICE_NAME)
        self.watcher: CheckpointWatcher | None = None
        self.fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []
        holder = self.holder
        metrics.ENGINES.labels("serving").set_function(lambda: 0 if holder.current is None else 1)
        metrics.ENGINES.labels("standby").set_function(lambda: 0 if holder.standby is None else 1)
        metrics.ENGINES.labels("retiring").set_function(lambda: len(holder.retiring))

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self, *, metrics_server: bool = True) -> int:
        """Starts gRPC (NOT_SERVING until a model is loaded), loads the start-up model, then follows promotions."""
        if self.settings.watch_checkpoints:
            await asyncio.to_thread(ensure_topics, self.settings.kafka, [self.settings.kafka.topic_checkpoints])
        port = await self.server.start(metrics=metrics_server)
        await self.server.set_serving(False)
        self._tasks.append(asyncio.create_task(self.streams.open.run_sweeper()))
        self._tasks.append(asyncio.create_task(self._monitor()))
        await self._load_initial()
        if self.settings.watch_checkpoints:
            self.watcher = CheckpointWatcher(
                self.settings.kafka, self.handle_event, asyncio.get_running_loop(), self.settings.consumer_group
            )
            self.watcher.start()
        return port

    def _candidates(self) -> Iterator[ModelInfo]:
        """Newest promoted checkpoints first, then the configured initial model."""
        for version in reversed(self.registry.promoted_versions()):
            try:
                yield load_checkpoint(self.registry, self.registry.get(version).path.name)
            except (KeyError, CheckpointError, SwapRefused) as exc:
                logger.error(
                    "skipping a promoted checkpoint that does not verify", extra={"version": version, "error": str(exc)}
                )
        if self.settings.initial_model:
            folder = resolve_model(self.settings.initial_model, self.settings.models)
            check_safe_folder(folder)
            yield ModelInfo.from_folder(folder, self.settings.initial_model, parameter_count(folder))

    async def _load_initial(self) -> None:
        candidates = await asyncio.to_thread(lambda: list(self._candidates()))
        for model in candidates:
            try:
                await self.swapper.start_initial(model)
                return
            except SwapRefused as exc:
                if model.version == 0:
                    raise
                logger.error("promoted checkpoint failed to load; trying an older one", extra={"error": str(exc)})
        logger.warning("no promoted checkpoint and no initial_model: NOT_SERVING until a promotion arrives")

    async def handle_event(self, event: pb.common.CheckpointEvent) -> str | None:
        """Swaps to a promoted checkpoint (called by the watcher on the event loop); returns why it was refused, or
        None when it is served or not newer than the served version."""
        served = self.swapper.served_version
        if served is not None and event.version <= served:
            metrics.SWAPS.labels("ignored").inc()
            logger.info("ignored a checkpoint that is not newer", extra={"version": event.version, "served": served})
            return None
        try:
            # The event is read from Kafka: it names a checkpoint of this service's registry or nothing.
            ref = checkpoint_id_of(event.registry_uri)
            model = await asyncio.to_thread(load_checkpoint, self.registry, ref, event.version, event.manifest_sha256)
        except (CheckpointError, SwapRefused) as exc:
            metrics.SWAPS.labels("failed").inc()
            why = exc.why if isinstance(exc, SwapRefused) else str(exc)
            logger.error(
                "refused promoted checkpoint version %d: %s", event.version, why, extra={"version": event.version}
            )
            return f"checkpoint version {event.version} refused: {why}"
        try:
            await self.swapper.swap_to(model)  # counts and logs its own failures
        except SwapRefused as exc:
            return f"checkpoint version {event.version} refused: {exc.why}"
        except FailedPrecondition:
            return None  # a newer version got there first: nothing wrong with this one
        return None

    def _on_model_change(self, model: ModelInfo | None) -> None:
        if model is None:
            return
        metrics.MODEL_VERSION.set(model.version)
        metrics.MODEL_INFO.info({"version": str(model.version), "run_id": model.run_id, "name": model.name})
        self._tasks.append(asyncio.ensure_future(self.server.set_serving(True)))

    def _fail(self, exc: BaseException) -> None:
        if not self.fatal.done():
            self.fatal.set_exception(EngineDied(f"the serving engine failed: {exc}"))

    async def _monitor(self, interval_s: float = 1.0) -> None:
        """Engine death is fatal for the engine serving new streams; a dead standby is just dropped."""
        while True:
            await asyncio.sleep(interval_s)
            current = self.holder.current
            if current is not None and current.engine.errored:
                self._fail(RuntimeError(f"engine for version {current.model.version} died"))
            standby = self.holder.standby
            if standby is not None and standby.engine.errored:
                self.holder.standby = None
                logger.error("standby engine died; dropped it")

    async def close(self) -> None:
        """Stops the watcher, background tasks and every engine (after the gRPC server drained)."""
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.swapper.close()
        await self.holder.shutdown()

    async def stop(self, grace: float = 0.0) -> None:
        """For in-process use: drain gRPC, then close."""
        await self.server.stop(grace)
        await self.close()


async def run(settings: ServingSettings) -> None:
    """`distillery serving serve`: runs until SIGTERM; exits non-zero when the serving engine dies."""
    setup_logging("serving", settings.log_level, settings.log_format)
    app = ServingApp(settings)
    try:
        await app.start()
    except BaseException:
        await app.close()
        await app.server.stop(0)
        raise
    await app.server.serve_until_signal(cleanup=app.close, fatal=app.fatal)
