"""The engine protocol the serving service talks to, and its vLLM `AsyncLLM` implementation.

The holder and the servicer only see `Engine`: tokenize, stream one completion, reload weights, probe, shut down.
`VllmEngine` runs vLLM's continuous-batching `AsyncLLM`; its engine core lives in child processes, so a start
(tens of seconds on CPU) runs in a thread and never blocks the event loop that streams tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from services.common.outvocab_vllm import stored_token_ids, token_ids_digest
from services.common.vllm_engine import VllmSettings, shutdown_async_llm, start_async_llm
from services.serving.metrics import ENGINE_STEP, GATHER_TOKENS
from services.serving.pacing import StepClock

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]
WORKER_EXTENSION = "services.serving.worker_ext.WeightReloadExtension"
#: The warm-up prompt: a short chat turn of the target task.
PROBE_MESSAGES = (("user", "Tom has 3 apples and buys 5 more. How many apples does he have now?"),)


@dataclass(frozen=True)
class Sampling:
    """Complete sampling settings of one stream (validated by the servicer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass
class Chunk:
    """What one engine step added to a stream."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class Probe:
    """A short greedy generation with the logprob of every generated token."""

    token_ids: list[int]
    logprobs: list[float]
    seconds: float

    def problems(self, vocab_size: int) -> list[str]:
        """What makes this probe unfit to serve (empty when it is fine)."""
        out = []
        if not self.token_ids:
            out.append("generated no tokens")
        if len(self.logprobs) != len(self.token_ids):
            out.append(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} tokens")
        bad_ids = [t for t in self.token_ids if not 0 <= t < vocab_size]
        if bad_ids:
            out.append(f"token ids {bad_ids[:5]} outside the vocabulary of {vocab_size}")
        bad_lp = [lp for lp in self.logprobs if not (math.isfinite(lp) and lp <= 1e-3)]
        if bad_lp:
            out.append(f"{len(bad_lp)} of {len(self.logprobs)} logprobs are not finite log-probabilities ({bad_lp[0]})")
        return out


class Engine(Protocol):
    """One loaded model that streams completions."""

    model_dir: Path

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def errored(self) -> bool: ...

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of a conversation with the chat template and the assistant turn opened."""
        ...

    def encode_text(self, text: str) -> list[int]: ...

    def generate(
        self, prompt_ids: list[int], sampling: Sampling, request_id: str, interval_s: float = 0.0
    ) -> AsyncIterator[Chunk]:
        """Streams one completion; closing the iterator aborts the request in the engine. With `interval_s`, chunks
        come at most once per interval (what the engine made meanwhile merged into one), except the last, which
        comes as soon as the completion ends; vLLM then also gathers a few tokens per output (`pacing.py`)."""
        ...

    async def reload(self, model_dir: Path) -> None:
        """Loads another checkpoint of the same architecture in place (call only while no request runs)."""
        ...

    async def probe(self, max_tokens: int) -> Probe: ...

    async def clear_cache(self) -> None:
        """Forgets every cached key and value (after weights that produced NaN have run)."""
        ...

    def num_unfinished(self) -> int: ...

    async def abort_all(self) -> None: ...

    async def shutdown(self) -> None: ...


EngineFactory = Callable[[Path], Awaitable[Engine]]


def model_context(model_dir: Path) -> int | None:
    """The longest sequence a model folder's config allows (vLLM refuses a longer max_model_len)."""
    config = json.loads((model_dir / "config.json").read_text())
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int | float) and value > 0 else None


def _end_of(queue: Any) -> asyncio.Future[None]:
    """A future done once vLLM has handed `queue` (the collector `AsyncLLM.add_request` returns) the request's last
    output, or an error. The collector wakes its reader at every step; this wakes a stream that waits out its
    interval only when the stream is over."""
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    put = queue.put

    def put_and_notice(output: Any) -> None:
        put(output)
        if not ended.done() and (isinstance(output, BaseException) or getattr(output, "finished", False)):
            ended.set_result(None)

    queue.put = put_and_notice
    return ended


class VllmEngine:
    """`Engine` over vLLM's `AsyncLLM`."""

    def __init__(self, llm: Any, model_dir: Path, *, head_sampling: bool = False, gather_max_tokens: int = 8) -> None:
        self._llm = llm
        self.model_dir = model_dir
        self.head_sampling = head_sampling
        """Whether the engine samples over a restricted head's own rows (`VllmSettings.head_sampling`)."""
        self._tokenizer = llm.get_tokenizer()
        self._max_model_len = int(llm.model_config.max_model_len)
        self._vocab_size = int(llm.model_config.get_vocab_size())
        self._running: set[str] = set()
        self._clock = StepClock(max_tokens=gather_max_tokens)
        """The engine's recent step time, from the paced streams' chunks: sets vLLM's own output interval."""

    @classmethod
    async def start(cls, model_dir: Path, settings: VllmSettings) -> VllmEngine:
        """Starts an engine for a safetensors model folder (in a thread: the event loop keeps streaming)."""
        started = time.perf_counter()
        llm = await asyncio.to_thread(
            start_async_llm,
            model_dir,
            settings,
            max_model_len=min(settings.max_model_len, model_context(model_dir) or settings.max_model_len),
            worker_extension_cls=WORKER_EXTENSION,
        )
        head_sampling = False
        if settings.head_sampling:
            try:
                head_sampling = all(await llm.collective_rpc("distillery_head_sampling"))
            except BaseException:
                await asyncio.to_thread(shutdown_async_llm, llm)
                raise
        logger.info(
            "engine started",
            extra={
                "model": str(model_dir),
                "seconds": round(time.perf_counter() - started, 2),
                "head_sampling": head_sampling,
            },
        )
        return cls(llm, model_dir, head_sampling=head_sampling, gather_max_tokens=settings.stream_gather_max_tokens)

    @staticmethod
    def factory(settings: VllmSettings) -> EngineFactory:
        async def start(model_dir: Path) -> Engine:
            return await VllmEngine.start(model_dir, settings)

        return start

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def errored(self) -> bool:
        return bool(self._llm.errored)

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        chat = [{"role": role, "content": content} for role, content in messages]
        text = self._tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def encode_text(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    async def generate(
        self, prompt_ids: list[int], sampling: Sampling, request_id: str, interval_s: float = 0.0
    ) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # Under a stream interval vLLM also gathers a few tokens before it builds an output (`pacing.py`).
        token_interval = self._clock.token_interval(interval_s)
        GATHER_TOKENS.set(token_interval)
        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            stop=list(sampling.stop) or None,
            ignore_eos=sampling.ignore_eos,
            min_tokens=sampling.min_tokens,
            output_kind=RequestOutputKind.DELTA,
            stream_interval=token_interval if token_interval > 1 else None,
        )
        completion = 0
        previous: float | None = None
        finished = False
        self._running.add(request_id)
        queue = None
        try:
            # `AsyncLLM.generate` without its loop: the collector `add_request` returns merges the steps made while
            # this stream waits out its interval into one delta (RequestOutputKind.DELTA), and `_end_of` says when
            # the last output came, so a stream that has ended does not wait for its interval to end.
            queue = await self._llm.add_request(request_id, TokensPrompt(prompt_token_ids=prompt_ids), params)
            ended = _end_of(queue) if interval_s > 0 else None
            while not finished:
                out = queue.get_nowait() or await queue.get()
                result = out.outputs[0]
                completion += len(result.token_ids)
                finished = out.finished
                sent = time.perf_counter()
                if ended is not None and previous is not None and not finished:
                    self._clock.observe(sent - previous, len(result.token_ids))  # the first and last mislead
                    ENGINE_STEP.set(self._clock.step_s or 0.0)
                previous = sent
                yield Chunk(
                    text=result.text,
                    token_ids=list(result.token_ids),
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=completion,
                    finish_reason=result.finish_reason if out.finished else None,  # type: ignore[arg-type]
                )
                if ended is not None and not finished:
                    remaining = interval_s - (time.perf_counter() - sent)
                    if remaining > 0 and not ended.done():
                        await asyncio.wait((ended,), timeout=remaining)
        finally:
            self._running.discard(request_id)
            if queue is not None:
                queue.close()
            if not finished and not self.errored:
                # The client went away (or we were cancelled): free the sequence's batch slot and KV blocks now.
                await self._llm.abort(request_id)

    async def reload(self, model_dir: Path) -> None:
        # No requests run here (the holder drained this engine), so "wait" returns at once; it also makes the
        # engine refuse to schedule anything while the weights change.
        expected = token_ids_digest(await asyncio.to_thread(stored_token_ids, model_dir))
        await self._llm.pause_generation(mode="wait", clear_cache=True)
        try:
            results = await self._llm.collective_rpc("distillery_reload", kwargs={"weights_path": str(model_dir)})
            # KV blocks cached for a prefix hold the old weights' keys and values.
            await self._llm.reset_prefix_cache()
        finally:
            await self._llm.resume_generation()
        # Two restricted heads of the same size share a fingerprint: the id map must have come with the weights.
        loaded = {result.get("output_vocab") for result in results}
        if loaded != {expected}:
            raise RuntimeError(f"{model_dir}: the engine holds output vocabulary {loaded}, the checkpoint {expected!r}")
        self.model_dir = model_dir

    async def probe(self, max_tokens: int) -> Probe:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            logprobs=1,
            ignore_eos=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        started = time.perf_counter()
        final = None
        request_id = f"warmup-{time.monotonic_ns()}"
        async for out in self._llm.generate(TokensPrompt(prompt_token_ids=self.encode_chat(PROBE_MESSAGES)), params,
                                            request_id):  # fmt: skip
            final = out
        if final is None:
            return Probe([], [], time.perf_counter() - started)
        result = final.outputs[0]
        ids = list(result.token_ids)
        logprobs = [float(step[tok].logprob) for step, tok in zip(result.logprobs or [], ids, strict=False)]
        return Probe(ids, logprobs, time.perf_counter() - started)

    async def clear_cache(self) -> None:
        await self._llm.pause_generation(mode="wait", clear_cache=True)
        try:
            await self._llm.reset_prefix_cache()
            await self._llm.collective_rpc("distillery_clear_kv_cache")
        finally:
            await self._llm.resume_generation()

    def num_unfinished(self) -> int:
        return int(self._llm.get_num_unfinished_requests())

    async def abort_all(self) -> None:
        if self._running:
            await self._llm.abort(list(self._running))

    async def shutdown(self) -> None:
        # AsyncLLM.shutdown blocks for seconds while its processes exit: keep the event loop streaming meanwhile.
        await asyncio.to_thread(shutdown_async_llm, self._llm)
