"""Bearer-token check for every gRPC server: a read-only token and an admin token, compared in constant time.

Health and reflection answer without a token (Kubernetes probes, grpcurl discovery). The read-only token reaches
the RPCs below; every other RPC, including any added later and not listed here, needs the admin token.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

#: Services that answer without a token.
PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

#: RPCs the read-only token reaches: they read state or generate text, and change nothing.
READ_ONLY_METHODS = frozenset(
    {
        "/distillery.teacher.v1.TeacherService/Generate",
        "/distillery.teacher.v1.TeacherService/Score",
        "/distillery.teacher.v1.TeacherService/GetModel",
        "/distillery.serving.v1.ServingService/Generate",
        "/distillery.serving.v1.ServingService/GetModel",
        "/distillery.trainer.v1.TrainerService/GetRun",
        "/distillery.trainer.v1.TrainerService/WatchRun",
        "/distillery.trainer.v1.TrainerService/ListCheckpoints",
    }
)

#: RPCs that change what a service does; listed for documentation and tests (anything unlisted is treated alike).
ADMIN_METHODS = frozenset(
    {
        "/distillery.trainer.v1.TrainerService/StartRun",
        "/distillery.trainer.v1.TrainerService/StopRun",
        "/distillery.trainer.v1.TrainerService/PromoteCheckpoint",
        "/distillery.serving.v1.ServingService/LoadModel",
    }
)

BEARER = "bearer "


def _matches(given: bytes, token: bytes | None) -> bool:
    # compare_digest takes time independent of where the bytes differ; both tokens are always compared.
    return token is not None and hmac.compare_digest(given, token)


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with `code`."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a valid `authorization: Bearer <token>`; PERMISSION_DENIED for the read-only token
    on an admin RPC."""

    def __init__(self, admin_token: str, read_token: str | None = None) -> None:
        self._admin = admin_token.encode()
        self._read = read_token.encode() if read_token is not None else None

    def role(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
        """ "admin", "read" or None for the bearer token in `metadata`."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if value is None or value[: len(BEARER)].lower() != BEARER:
            return None
        given = value[len(BEARER) :].strip().encode("utf-8", errors="replace")
        is_admin, is_read = _matches(given, self._admin), _matches(given, self._read)
        return "admin" if is_admin else "read" if is_read else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if method.split("/")[1:2] and method.split("/")[1] in PUBLIC_SERVICES:
            return await continuation(handler_call_details)
        role = self.role(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        if role == "admin" or (role == "read" and method in READ_ONLY_METHODS):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: UNIMPLEMENTED as without the interceptor
        if role is None:
            return _denied(
                handler, grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid 'Bearer <token>' is required"
            )
        return _denied(handler, grpc.StatusCode.PERMISSION_DENIED, f"{method.rsplit('/', 1)[-1]} needs the admin token")


def server_interceptors(admin_token: str | None, read_token: str | None) -> list[grpc.aio.ServerInterceptor]:
    return [] if admin_token is None else [TokenAuthInterceptor(admin_token, read_token)]
