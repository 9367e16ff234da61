"""gRPC `ServingService`: proto ⇄ domain translation and validation only.

Every refusal names the field and the value: bad values → INVALID_ARGUMENT, values over a limit →
RESOURCE_EXHAUSTED (via `services.common.errors`).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import pb
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, grpc_method
from services.common.registry import Registry
from services.serving.engine import Sampling
from services.serving.model import ModelInfo
from services.serving.settings import LimitSettings
from services.serving.streams import Prompt, StreamService
from services.serving.swap import Swapper, load_checkpoint

ROLES = ("system", "user", "assistant")
FINISH = {
    "stop": pb.common.FINISH_REASON_STOP,
    "length": pb.common.FINISH_REASON_LENGTH,
    "abort": pb.common.FINISH_REASON_ABORT,
}
EXTRA_OPTIONS = ("ignore_eos", "min_tokens")


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidArgument(f"sampling.{name}", value, f"must be in {bracket}{low}, {high}]")
    return float(value)


def _extra(params: pb.common.SamplingParams, max_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in sorted(params.extra.items()):
        field = f"sampling.extra[{name!r}]"
        if name not in EXTRA_OPTIONS:
            raise InvalidArgument(field, raw, f"unknown option; the serving service accepts {list(EXTRA_OPTIONS)}")
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise InvalidArgument(field, raw, "must be a JSON value") from exc
        if name == "ignore_eos" and not isinstance(value, bool):
            raise InvalidArgument(field, raw, "must be true or false")
        if name == "min_tokens" and not (isinstance(value, int) and 0 <= value <= max_tokens):
            raise InvalidArgument(field, raw, f"must be an integer in [0, max_tokens={max_tokens}]")
        out[name] = value
    return out


def sampling_from_proto(params: pb.common.SamplingParams, limits: LimitSettings) -> Sampling:
    """Validated sampling settings; unset fields take the defaults."""
    max_tokens = params.max_tokens if params.HasField("max_tokens") else limits.default_max_tokens
    if max_tokens < 1:
        raise InvalidArgument("sampling.max_tokens", max_tokens, "must be at least 1")
    if max_tokens > limits.max_tokens:
        raise ResourceExhausted(
            f"sampling.max_tokens={max_tokens} is over the limit of {limits.max_tokens} (limits.max_tokens)"
        )
    if params.HasField("n") and params.n != 1:
        raise InvalidArgument("sampling.n", params.n, "the serving service streams one completion (n=1)")
    if params.HasField("logprobs") and params.logprobs != 0:
        raise InvalidArgument("sampling.logprobs", params.logprobs, "the serving service does not return logprobs")
    if params.HasField("top_k") and params.top_k < -1:
        raise InvalidArgument("sampling.top_k", params.top_k, "must be -1 or 0 (off) or a positive count")
    if len(params.stop) > limits.max_stop_strings:
        raise InvalidArgument("sampling.stop", list(params.stop), f"at most {limits.max_stop_strings} stop strings")
    if any(not s for s in params.stop):
        raise InvalidArgument("sampling.stop", list(params.stop), "stop strings must not be empty")
    extra = _extra(params, max_tokens)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_check_range("temperature", params.temperature, 0, 10) if params.HasField("temperature") else 1.0,
        top_p=_check_range("top_p", params.top_p, 0, 1, low_open=True) if params.HasField("top_p") else 1.0,
        top_k=max(params.top_k, 0) if params.HasField("top_k") else 0,
        min_p=_check_range("min_p", params.min_p, 0, 1) if params.HasField("min_p") else 0.0,
        repetition_penalty=(
            _check_range("repetition_penalty", params.repetition_penalty, 0, 10, low_open=True)
            if params.HasField("repetition_penalty")
            else 1.0
        ),
        presence_penalty=(
            _check_range("presence_penalty", params.presence_penalty, -2, 2)
            if params.HasField("presence_penalty")
            else 0.0
        ),
        frequency_penalty=(
            _check_range("frequency_penalty", params.frequency_penalty, -2, 2)
            if params.HasField("frequency_penalty")
            else 0.0
        ),
        stop=tuple(params.stop),
        ignore_eos=bool(extra.get("ignore_eos", False)),
        min_tokens=int(extra.get("min_tokens", 0)),
    )


def prompt_from_request(request: pb.serving.GenerateRequest) -> Prompt:
    if request.messages and request.prompt:
        raise InvalidArgument("prompt", request.prompt, "give either messages or prompt, not both")
    if request.prompt:
        return request.prompt
    if not request.messages:
        raise InvalidArgument("messages", [], "give messages (a chat) or prompt (raw text)")
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role", message.role, f"must be one of {list(ROLES)}")
    return tuple((m.role, m.content) for m in request.messages)


def model_to_proto(model: ModelInfo) -> pb.serving.ModelInfo:
    loaded = Timestamp()
    loaded.FromNanoseconds(int(model.loaded_at * 1e9))
    return pb.serving.ModelInfo(
        version=model.version,
        run_id=model.run_id,
        registry_uri=model.registry_uri,
        manifest_sha256=model.manifest_sha256,
        parameter_count=model.parameter_count,
        loaded_at=loaded,
        metrics=model.metrics,
        name=model.name,
    )


class ServingServicer(pb.serving_grpc.ServingServiceServicer):
    def __init__(self, streams: StreamService, swapper: Swapper, registry: Registry) -> None:
        self.streams = streams
        self.swapper = swapper
        self.registry = registry

    @grpc_method("serving")
    async def Generate(self, request: pb.serving.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        prompt = prompt_from_request(request)
        sampling = sampling_from_proto(request.sampling, self.streams.limits)
        async for out in self.streams.generate(prompt, sampling, request.request_id):
            chunk = out.chunk
            response = pb.serving.GenerateResponse(
                text_delta=chunk.text, token_ids=chunk.token_ids, model_version=out.model.version
            )
            if chunk.finish_reason is not None:
                response.finish_reason = FINISH.get(chunk.finish_reason, pb.common.FINISH_REASON_UNSPECIFIED)
                response.usage.prompt_tokens = chunk.prompt_tokens
                response.usage.completion_tokens = chunk.completion_tokens
            yield response

    @grpc_method("serving")
    async def GetModel(
        self, request: pb.serving.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.serving.GetModelResponse:
        model = self.swapper.holder.model
        if model is None:
            raise NotFound("no model is loaded yet: the service waits for the first promoted checkpoint")
        return pb.serving.GetModelResponse(model=model_to_proto(model))

    @grpc_method("serving")
    async def LoadModel(
        self, request: pb.serving.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.serving.LoadModelResponse:
        path = self.registry.find_requested(request)
        # Hashing every file takes a while: off the event loop.
        model = await asyncio.to_thread(load_checkpoint, self.registry, path.name)
        result = await self.swapper.swap_to(model, allow_older=request.allow_older)
        return pb.serving.LoadModelResponse(model=model_to_proto(result.model), swap_s=result.seconds)
