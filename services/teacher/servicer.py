"""`TeacherService` over gRPC: proto ⇄ domain translation only; the engine does the work."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc

from services.common import pb
from services.common.errors import InvalidArgument, ResourceExhausted, grpc_method
from services.common.prompt_size import off_loop, prompt_chars
from services.teacher import metrics
from services.teacher.engine import FinishReason, Logprobs, TeacherEngine
from services.teacher.inputs import check_length, check_size, check_token_ids, render_prompt
from services.teacher.sampling import Limits, sampling_from_proto

FINISH_REASONS: dict[FinishReason | None, int] = {
    None: pb.common.FINISH_REASON_UNSPECIFIED,
    "stop": pb.common.FINISH_REASON_STOP,
    "length": pb.common.FINISH_REASON_LENGTH,
    "abort": pb.common.FINISH_REASON_ABORT,
}


def token_logprobs(token_ids: list[int], logprobs: Logprobs) -> list[pb.common.TokenLogprobs]:
    """Packed logprobs → one `TokenLogprobs` per token."""
    k = logprobs.top_k
    return [
        pb.common.TokenLogprobs(
            token_id=token,
            logprob=logprobs.sampled[i],
            top_ids=logprobs.top_ids[i * k : (i + 1) * k],
            top_logprobs=logprobs.top_logprobs[i * k : (i + 1) * k],
        )
        for i, token in enumerate(token_ids)
    ]


class StreamLimiter:
    """Counts open streams; one past the limit is refused (RESOURCE_EXHAUSTED), never queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.open >= self.limit:
            raise ResourceExhausted(f"too many concurrent Generate streams: {self.open} open, limit {self.limit}")
        self.open += 1
        metrics.STREAMS_OPEN.set(self.open)
        try:
            yield
        finally:
            self.open -= 1
            metrics.STREAMS_OPEN.set(self.open)


class TeacherServicer(pb.teacher_grpc.TeacherServiceServicer):
    def __init__(self, engine: TeacherEngine, limits: Limits, max_concurrent_streams: int) -> None:
        self.engine = engine
        self.limits = limits
        self.streams = StreamLimiter(max_concurrent_streams)

    @grpc_method("teacher")
    async def Generate(
        self, request: pb.teacher.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.teacher.GenerateResponse]:
        sampling = sampling_from_proto(request.sampling, self.limits)
        check_size(request.messages, request.prompt, self.limits.prompt_size)
        chars = prompt_chars(request.prompt or request.messages)
        prompt, _ = await off_loop(render_prompt, self.engine, request.messages, request.prompt, chars=chars)
        model = self.engine.info.name
        with self.streams.slot():
            submitted = last = time.monotonic()
            counts: dict[int, int] = {}
            first_chunk = True
            async for chunk in self.engine.generate(prompt, sampling, request.request_id or uuid.uuid4().hex):
                now = time.monotonic()
                n_new = len(chunk.token_ids)
                if chunk.index not in counts and n_new:
                    metrics.TIME_TO_FIRST_TOKEN.observe(now - submitted)
                elif n_new:
                    metrics.INTER_TOKEN_LATENCY.observe((now - last) / n_new)
                last = now
                counts[chunk.index] = counts.get(chunk.index, 0) + n_new
                metrics.GENERATED_TOKENS.inc(n_new)
                response = pb.teacher.GenerateResponse(
                    index=chunk.index,
                    token_ids=chunk.token_ids,
                    text_delta=chunk.text,
                    logprobs=token_logprobs(chunk.token_ids, chunk.logprobs),
                    finish_reason=FINISH_REASONS[chunk.finish_reason],  # type: ignore[arg-type]
                    model=model,
                )
                if first_chunk:
                    response.prompt_token_ids.extend(prompt.token_ids)
                    first_chunk = False
                if chunk.finish_reason is not None:
                    response.usage.prompt_tokens = len(prompt.token_ids)
                    response.usage.completion_tokens = counts[chunk.index]
                yield response

    @grpc_method("teacher")
    async def Score(
        self, request: pb.teacher.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.teacher.ScoreResponse:
        info = self.engine.info
        given = [name for name in ("prompt_token_ids", "messages", "prompt") if getattr(request, name)]
        if len(given) > 1:
            raise InvalidArgument(given[1], "set", f"give one of prompt_token_ids, messages or prompt, not {given}")
        if request.prompt_token_ids:
            prompt_ids = list(request.prompt_token_ids)
            check_token_ids("prompt_token_ids", prompt_ids, info.vocab_size)
        else:
            check_size(request.messages, request.prompt, self.limits.prompt_size)
            chars = prompt_chars(request.prompt or request.messages)
            rendered = await off_loop(render_prompt, self.engine, request.messages, request.prompt, chars=chars)
            prompt_ids = rendered[0].token_ids
        completion = list(request.completion_token_ids)
        if not completion:
            raise InvalidArgument("completion_token_ids", [], "empty: nothing to score")
        check_token_ids("completion_token_ids", completion, info.vocab_size)
        top_k = request.top_k or min(self.limits.default_top_k, info.max_logprobs)
        if top_k > info.max_logprobs:
            raise InvalidArgument("top_k", top_k, f"top-k logprobs must be in [1, {info.max_logprobs}]")
        check_length(self.engine, len(prompt_ids) + len(completion), "completion_token_ids")
        logprobs = await self.engine.score(prompt_ids + completion, len(prompt_ids), top_k)
        return pb.teacher.ScoreResponse(
            positions=token_logprobs(completion, logprobs), prompt_token_ids=prompt_ids, model=info.name
        )

    @grpc_method("teacher")
    async def GetModel(
        self, request: pb.teacher.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.teacher.GetModelResponse:
        info = self.engine.info
        return pb.teacher.GetModelResponse(
            model=info.name,
            revision=info.revision,
            max_model_len=info.max_model_len,
            max_logprobs=info.max_logprobs,
            parameter_count=info.parameter_count,
        )
