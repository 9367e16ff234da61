"""The one exception → gRPC status table, and a decorator that applies it to servicer methods.

ValueError / validation → INVALID_ARGUMENT (the message names the field and value); overload →
RESOURCE_EXHAUSTED; missing run or checkpoint → NOT_FOUND; wrong state → FAILED_PRECONDITION; anything else →
INTERNAL with the traceback logged. Errors always abort the call; they never travel inside a response.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import pydantic

from services.common import metrics
from services.common.text import clip, clip_message

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with a gRPC status code; the message is sent to the client."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"{field}={clip(value)}: {why}")
        self.field = field
        self.value = value


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps an exception to (status code, client message)."""
    if isinstance(exc, ServiceError):
        return exc.code, clip_message(str(exc))
    if isinstance(exc, pydantic.ValidationError):
        parts = [
            f"{'.'.join(str(p) for p in err['loc'])}={clip(err.get('input'))}: {err['msg']}" for err in exc.errors()
        ]
        return grpc.StatusCode.INVALID_ARGUMENT, clip_message("; ".join(parts))
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, clip_message(str(exc))
    if isinstance(exc, KeyError | FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND, clip_message(str(exc))
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


F = TypeVar("F", bound=Callable[..., Any])


class _Outcome:
    """Counts one RPC in `distillery_grpc_requests_total` exactly once, whatever way it ends."""

    def __init__(self, service: str, method: str, context: grpc.aio.ServicerContext) -> None:
        self.labels = (service, method)
        self.counted = False
        # A stream cancelled while grpc is writing its last message never sees the cancellation inside the
        # servicer's generator (it is finalized later, or never): the RPC's done callback counts it.
        add_done_callback = getattr(context, "add_done_callback", None)
        if add_done_callback is not None:
            add_done_callback(lambda _: self.count("CANCELLED"))

    def count(self, code: str) -> None:
        if not self.counted:
            self.counted = True
            metrics.GRPC_REQUESTS.labels(*self.labels, code).inc()


def grpc_method(service: str) -> Callable[[F], F]:
    """Wraps a unary or server-streaming `grpc.aio` servicer method with the status table and request metrics."""

    def decorate(fn: F) -> F:
        method = fn.__name__

        async def fail(exc: BaseException, context: grpc.aio.ServicerContext, outcome: _Outcome) -> None:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                logger.exception("%s.%s failed", service, method, exc_info=exc)
            else:
                logger.info("%s.%s refused: %s %s", service, method, code.name, message)
            outcome.count(code.name)
            await context.abort(code, message)

        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                outcome = _Outcome(service, method, context)
                try:
                    async for item in fn(self, request, context):
                        yield item
                except (asyncio.CancelledError, GeneratorExit):
                    outcome.count("CANCELLED")
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(exc, context, outcome)
                else:
                    outcome.count("OK")

            return stream  # type: ignore[return-value]

        @functools.wraps(fn)
        async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            outcome = _Outcome(service, method, context)
            try:
                result = await fn(self, request, context)
            except asyncio.CancelledError:
                outcome.count("CANCELLED")
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(exc, context, outcome)
            outcome.count("OK")
            return result

        return unary  # type: ignore[return-value]

    return decorate
