"""Property-based fuzzing of a gRPC service (hypothesis, seeded and bounded): random and boundary messages built
from the proto descriptors, raw random bytes, huge repeated fields. The property for every request: the status is
one of the documented codes (never UNKNOWN or INTERNAL), health still answers SERVING, and a normal request still
succeeds afterwards.

Hypothesis drives a plain function on a worker thread; each example is sent on the test's event loop (where the
in-process server runs), so failures shrink like any hypothesis failure.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: Codes a request may get (the documented status table); UNKNOWN and INTERNAL are bugs.
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a stream the fuzzer stops waiting for
}

INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
BOUNDARY_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-45, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]


def _text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(["", " ", "user", "assistant", "system", "../../etc/passwd", "file://host/etc", "/", "\x00"]),
        st.integers(1_000, 200_000).map(lambda n: "a" * n),  # big (often over a limit)
    )


def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.type in INTS:
        low, high = INTS[f.type]
        return st.one_of(st.integers(low, high), st.sampled_from([0, 1, -1 if low < 0 else 2, low, high]))
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.one_of(st.floats(allow_nan=True, width=32), st.sampled_from(BOUNDARY_FLOATS))
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_STRING:
        return _text()
    if f.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if f.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 200))  # unknown values too (open enums)
    raise TypeError(f.type)


def messages(descriptor: Descriptor, cls: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Random messages of `cls`: each field unset or random; repeated fields up to 5 items, sometimes thousands."""

    @st.composite
    def build(draw: Any) -> Any:
        msg = cls()
        for f in descriptor.fields:
            if not draw(st.booleans()):
                continue
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                if value.message_type is None:
                    entries = draw(st.dictionaries(_scalar(key), _scalar(value), max_size=4))
                    getattr(msg, f.name).update(entries)
                continue
            if f.message_type is not None:
                if depth >= 3:
                    continue
                sub_cls = type(getattr(msg, f.name)) if not _repeated(f) else type(getattr(msg, f.name).add())
                if _repeated(f):
                    del getattr(msg, f.name)[:]
                    items = draw(st.lists(messages(f.message_type, sub_cls, depth + 1), max_size=4))
                    getattr(msg, f.name).extend(items)
                else:
                    getattr(msg, f.name).CopyFrom(draw(messages(f.message_type, sub_cls, depth + 1)))
                continue
            if _repeated(f):
                if draw(st.integers(0, 9)) == 0:  # a huge repeated field, of small items
                    small = "a" if f.type == FieldDescriptor.TYPE_STRING else draw(_scalar(f))
                    if f.type == FieldDescriptor.TYPE_BYTES:
                        small = b"a"
                    getattr(msg, f.name).extend([small] * 20_000)
                else:
                    getattr(msg, f.name).extend(draw(st.lists(_scalar(f), max_size=5)))
            else:
                setattr(msg, f.name, draw(_scalar(f)))
        return msg

    return build()


def _repeated(f: FieldDescriptor) -> bool:
    return bool(getattr(f, "is_repeated", False) or getattr(f, "label", 0) == FieldDescriptor.LABEL_REPEATED)


def raw_requests(cls: Any) -> st.SearchStrategy[bytes]:
    """Bytes a hostile client can send: random, or a valid message with some bytes flipped or cut."""

    @st.composite
    def mutated(draw: Any) -> bytes:
        data = bytearray(draw(messages(cls.DESCRIPTOR, cls)).SerializeToString())
        for _ in range(draw(st.integers(1, 4))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)

    return st.one_of(st.binary(max_size=200), mutated())


@dataclass
class Rpc:
    """One RPC to fuzz: its full method name, request class and whether it streams responses."""

    method: str
    request: Any
    streaming: bool = False


@dataclass
class Fuzzer:
    channel: grpc.aio.Channel
    loop: asyncio.AbstractEventLoop
    timeout_s: float = 10.0
    codes: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: int = 0

    async def call(self, rpc: Rpc, payload: bytes, max_messages: int = 3) -> grpc.StatusCode:
        """Sends raw bytes; reads at most `max_messages` of a stream, then cancels it."""
        if rpc.streaming:
            call = self.channel.unary_stream(rpc.method)(payload, timeout=self.timeout_s)
            try:
                for _ in range(max_messages):
                    if await call.read() is grpc.aio.EOF:
                        break
                else:
                    call.cancel()
                    return grpc.StatusCode.OK
                return await call.code()
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        try:
            await self.channel.unary_unary(rpc.method)(payload, timeout=self.timeout_s)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    async def check(self, rpc: Rpc, payload: bytes) -> None:
        code = await self.call(rpc, payload)
        self.examples += 1
        counts = self.codes.setdefault(rpc.method.rsplit("/", 1)[-1], {})
        counts[code.name] = counts.get(code.name, 0) + 1
        assert code in DOCUMENTED, f"{rpc.method} answered {code.name} to {payload[:200]!r}"

    def run(self, rpc: Rpc, max_examples: int) -> None:
        """Blocking: drives hypothesis on the calling (worker) thread, each example on the event loop."""
        strategy = st.one_of(messages(rpc.request.DESCRIPTOR, rpc.request).map(lambda m: m.SerializeToString()),
                             raw_requests(rpc.request))  # fmt: skip

        @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), print_blob=False)  # fmt: skip
        @given(strategy)
        def prop(payload: bytes) -> None:
            asyncio.run_coroutine_threadsafe(self.check(rpc, payload), self.loop).result(120)

        prop()


async def fuzz(
    channel: grpc.aio.Channel,
    rpcs: list[Rpc],
    max_examples: int,
    normal: Callable[[], Awaitable[object]],
    timeout_s: float = 10.0,
) -> Fuzzer:
    """Fuzzes each RPC, then checks that health says SERVING and `normal()` (one ordinary request) succeeds."""
    fuzzer = Fuzzer(channel, asyncio.get_running_loop(), timeout_s)
    for rpc in rpcs:
        await asyncio.to_thread(fuzzer.run, rpc, max_examples)
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"unhealthy after fuzzing {rpc.method}"
        await normal()
    return fuzzer
