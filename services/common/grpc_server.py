"""`grpc.aio` server bootstrap: standard health + reflection, metrics endpoint, graceful SIGTERM drain.

server = GrpcServer("teacher", settings)
teacher_grpc.add_TeacherServiceServicer_to_server(servicer, server.server)
server.add_service_name(pb.teacher.DESCRIPTOR.services_by_name["TeacherService"].full_name)
await server.start()
await server.serve_until_signal(cleanup=engine.shutdown)
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.auth import server_interceptors
from services.common.guard import RequestGuard
from services.common.metrics import start_metrics_server
from services.common.security import bind_port, start_probe_server
from services.common.settings import ServiceSettings

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Health service name that says only "the process is alive" (for liveness probes): `set_serving` never changes it,
#: so a service NOT_SERVING because a dependency (Kafka) is away is taken out of rotation, not restarted.
LIVENESS = "liveness"


def connection_age_options(max_age_s: float | None) -> list[tuple[str, int]]:
    """Server options that end connections after `max_age_s` (±10% jitter, gRPC's), never the calls on them: the
    grace for open calls is left at gRPC's default, unbounded, so a long Generate stream is not cut."""
    return [] if max_age_s is None else [("grpc.max_connection_age_ms", max(1, round(max_age_s * 1000)))]


class GrpcServer:
    """One gRPC server per service process, with health, reflection and a graceful stop."""

    def __init__(self, name: str, settings: ServiceSettings) -> None:
        self.name = name
        self.settings = settings
        self.guard = RequestGuard(settings.open_streams_limit)
        self.server = grpc.aio.server(
            # Tokens first (an unauthenticated caller reaches nothing); then undecodable requests → INVALID_ARGUMENT
            # (not UNKNOWN) and long-lived streams limited below the RPC cap.
            interceptors=[*server_interceptors(*settings.auth.server_tokens()), self.guard],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                *connection_age_options(settings.max_connection_age_s),
            ],
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self.port = 0
        self.metrics_port = 0
        self._stopping = asyncio.Event()
        self._probe_server: grpc.aio.Server | None = None

    def add_service_name(self, full_name: str) -> None:
        """Registers a service for health (`""` and its own name) and reflection; call before `start`."""
        self._service_names.append(full_name)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self, *, metrics: bool = True) -> int:
        names = [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        self.port = bind_port(self.server, self.settings.host, self.settings.grpc_port, self.settings.tls, self.name)
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC on {self.settings.host}:{self.settings.grpc_port}")
        await self.server.start()
        if self.settings.tls.health_port is not None:
            self._probe_server = await start_probe_server(
                self.health, self.settings.host, self.settings.tls.health_port
            )
        if metrics:
            self.metrics_port = start_metrics_server(self.settings.host, self.settings.metrics_port, self.name)
        for service in ["", LIVENESS, *self._service_names]:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "%s serving",
            self.name,
            extra={"grpc": self.address, "metrics_port": self.metrics_port, "services": self._service_names},
        )
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ["", *self._service_names]:
            await self.health.set(service, status)

    def request_stop(self) -> None:
        """Asks `serve_until_signal` to drain and stop (safe from signal handlers and other tasks)."""
        self._stopping.set()

    async def stop(self, grace: float | None = None) -> None:
        """Health → NOT_SERVING, then let in-flight RPCs finish for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_period_s if grace is None else grace)
        if self._probe_server is not None:
            await self._probe_server.stop(0)

    async def serve_until_signal(
        self,
        cleanup: Callable[[], Awaitable[None]] | None = None,
        fatal: asyncio.Future[None] | None = None,
    ) -> None:
        """Runs until SIGTERM/SIGINT, `request_stop()` or `fatal` completing; then drains and cleans up.

        `fatal` is a future the service completes (with an exception) when its engine dies: the server stops
        and the exception propagates, so the process exits non-zero and the orchestrator restarts it.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(self._stopping.wait())]
        if fatal is not None:
            waiters.append(fatal)  # type: ignore[arg-type]
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            logger.info("%s stopping", self.name)
            await self.stop()
        finally:
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
            if cleanup is not None:
                await cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if fatal is not None and fatal in done:
            fatal.result()  # re-raises the engine's error
