"""Streams: one Generate from admission to its last token, with limits and reading-speed metrics.

Admission control happens before a stream leases the current model: too many open streams, a prompt that is too
long or a completion that would not fit the model's context are refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.prompt_size import PromptSize, check_prompt_size, off_loop, prompt_chars
from services.serving.engine import Chunk, Sampling
from services.serving.holder import EngineHolder
from services.serving.metrics import OpenStreams
from services.serving.model import ModelInfo
from services.serving.settings import LimitSettings

Prompt = Sequence[tuple[str, str]] | str


@dataclass(frozen=True)
class StreamChunk:
    model: ModelInfo
    chunk: Chunk


class StreamService:
    """Runs Generate streams against whatever the holder serves."""

    def __init__(self, holder: EngineHolder, limits: LimitSettings, interval_s: float = 0.0) -> None:
        self.holder = holder
        self.limits = limits
        self.interval_s = interval_s
        """Minimum time between a stream's messages (`ServingSettings.stream_interval_ms`)."""
        self.open = OpenStreams()

    async def generate(self, prompt: Prompt, sampling: Sampling, request_id: str = "") -> AsyncIterator[StreamChunk]:
        parts = (
            [("prompt", prompt)]
            if isinstance(prompt, str)
            else [(f"messages[{i}].content", content) for i, (_, content) in enumerate(prompt)]
        )
        check_prompt_size(parts, PromptSize(self.limits.max_prompt_chars, self.limits.max_prompt_bytes))
        if len(self.open) >= self.limits.max_concurrent_streams:
            raise ResourceExhausted(
                f"{len(self.open)} streams are open; the limit is {self.limits.max_concurrent_streams} "
                "(limits.max_concurrent_streams): retry later"
            )
        meter = self.open.open()
        result = "error"
        try:
            async with self.holder.lease() as slot:
                engine = slot.engine
                # The tokenizer runs on its own thread: a long prompt never stalls other streams or health checks.
                encode = engine.encode_text if isinstance(prompt, str) else engine.encode_chat
                ids = await off_loop(encode, prompt, chars=prompt_chars(prompt))
                if not ids:
                    raise InvalidArgument("prompt", prompt, "encodes to no tokens")
                if len(ids) > self.limits.max_prompt_tokens:
                    raise ResourceExhausted(
                        f"the prompt is {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens} "
                        "(limits.max_prompt_tokens)"
                    )
                if len(ids) + sampling.max_tokens > engine.max_model_len:
                    raise ResourceExhausted(
                        f"prompt ({len(ids)} tokens) + sampling.max_tokens ({sampling.max_tokens}) exceeds the "
                        f"model's context of {engine.max_model_len} tokens"
                    )
                engine_id = f"{request_id or 'gen'}-{uuid.uuid4().hex[:12]}"
                # The engine paces the chunks: at most one per interval, the last one at once.
                async for chunk in engine.generate(ids, sampling, engine_id, interval_s=self.interval_s):
                    meter.chunk(chunk.text, len(chunk.token_ids))
                    if chunk.finish_reason is not None:
                        result = "error" if chunk.finish_reason == "abort" else "ok"
                    yield StreamChunk(slot.model, chunk)
        except (asyncio.CancelledError, GeneratorExit):
            result = "cancelled"
            raise
        finally:
            self.open.close(meter, result)
