"""A server interceptor guarding every RPC before the servicer runs.

- Undecodable requests (invalid UTF-8 in a string field, malformed protobuf) get INVALID_ARGUMENT naming the field,
  where grpc would answer UNKNOWN and log a traceback at ERROR.
- Long-lived server streams (Generate, WatchRun) have a limit of their own, below gRPC's `maximum_concurrent_rpcs`,
  so open streams can never take the slots health checks need; health and reflection are never limited.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.text import clip

logger = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request the deserializer refused; the wrapped handler aborts on it."""

    def __init__(self, message_type: Any, raw: bytes, error: Exception) -> None:
        descriptor = getattr(message_type, "DESCRIPTOR", None)
        self.field = bad_utf8_field(descriptor, raw) if isinstance(descriptor, Descriptor) else None
        name = descriptor.full_name if isinstance(descriptor, Descriptor) else "the request"
        if self.field:
            self.message = f"{self.field}: not valid UTF-8 (string fields must be UTF-8 text)"
        else:
            self.message = f"request: not a valid {name} message ({clip(str(error))})"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def bad_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "", depth: int = 0) -> str | None:
    """The dotted path of the first string field in `data` (wire format of `descriptor`) that is not UTF-8."""
    if depth > 32:
        return None
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + size], pos + size
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                name = f"{prefix}{field.name}"
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return name
                elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
                    found = bad_utf8_field(field.message_type, chunk, f"{name}.", depth + 1)
                    if found:
                        return found
            else:
                return None
    except ValueError:
        return None
    return None


#: Services never limited by the stream limit (probes and tooling must always get through).
UNLIMITED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class RequestGuard(grpc.aio.ServerInterceptor):
    """Wraps unary-request handlers: a request that does not deserialize gets INVALID_ARGUMENT, and a server stream
    beyond `max_open_streams` gets RESOURCE_EXHAUSTED."""

    def __init__(self, max_open_streams: int) -> None:
        self.max_open_streams = max_open_streams
        self.open_streams = 0

    async def _open_stream(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Takes a stream slot, released when the RPC ends however it ends (a done callback: a cancelled stream's
        generator may be finalized much later)."""
        if self.open_streams >= self.max_open_streams:
            logger.info("%s refused: RESOURCE_EXHAUSTED %d streams open", method, self.open_streams)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.open_streams} streams are open; the limit is {self.max_open_streams} (max_open_streams): "
                "retry later",
            )
        self.open_streams += 1

        def release(_: object) -> None:
            self.open_streams -= 1

        context.add_done_callback(release)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        original = handler.request_deserializer
        message_type = getattr(original, "__self__", None)
        method = handler_call_details.method

        def deserialize(raw: bytes) -> Any:
            try:
                return original(raw)
            except Exception as exc:
                return Undecodable(message_type, raw, exc)

        async def refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
            logger.info("%s refused: INVALID_ARGUMENT %s", method, request.message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

        if not handler.response_streaming:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=deserialize, response_serializer=handler.response_serializer
            )
        inner_stream = handler.unary_stream
        limited = not method.startswith(UNLIMITED)
        if inspect.isasyncgenfunction(inner_stream):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                if limited:
                    await self._open_stream(method, context)
                async for item in inner_stream(request, context):
                    yield item

            behavior: Any = stream
        else:

            async def writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                if limited:
                    await self._open_stream(method, context)
                return await inner_stream(request, context)

            behavior = writer
        return grpc.unary_stream_rpc_method_handler(
            behavior, request_deserializer=deserialize, response_serializer=handler.response_serializer
        )
