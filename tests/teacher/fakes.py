"""A fake `TeacherEngine` with predictable output, for tests of the translation and pipeline layers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from services.teacher.engine import Chunk, Logprobs, ModelInfo, Prompt
from services.teacher.sampling import Sampling

INFO = ModelInfo("fake", "rev1", max_model_len=64, max_logprobs=4, vocab_size=100, parameter_count=7, max_num_seqs=8)


def fake_logprobs(tokens: list[int], k: int = 2) -> Logprobs:
    """Token t: sampled logprob -t/10; top-k ids t, t+1, … with logprobs -0.1, -0.2, …"""
    out = Logprobs(k)
    for t in tokens:
        out.sampled.append(-t / 10)
        out.top_ids.extend(t + j for j in range(k))
        out.top_logprobs.extend(-0.1 * (j + 1) for j in range(k))
    return out


class FakeEngine:
    info = INFO

    def __init__(self) -> None:
        self.dead: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.requests: list[tuple[Prompt, Sampling]] = []
        #: (token_ids, first, top_k) of every `score` call.
        self.scored: list[tuple[list[int], int, int]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.block = False

    def render(self, messages: Sequence[dict[str, str]] | None = None, text: str | None = None) -> Prompt:
        content = text if text is not None else "|".join(f"{m['role']}:{m['content']}" for m in messages or [])
        return Prompt(content, [ord(c) % 100 for c in content])

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(97 + t % 26) for t in token_ids)

    def encode_completion(self, text: str) -> list[int]:
        return [ord(c) % 100 for c in text] + [0]  # 0: end of sequence

    async def generate(
        self, prompt: Prompt, sampling: Sampling, request_id: str | None = None, *, stream_interval: int = 1
    ) -> AsyncIterator[Chunk]:
        self.requests.append((prompt, sampling))
        self.started.set()
        if self.block:
            await self.release.wait()
        for index in range(sampling.n):
            yield Chunk(index, [1, 2], "ab", fake_logprobs([1, 2], sampling.logprobs))
            yield Chunk(index, [3], "c", fake_logprobs([3], sampling.logprobs), finish_reason="length")

    async def score(self, token_ids: Sequence[int], first: int, top_k: int) -> Logprobs:
        self.scored.append((list(token_ids), first, top_k))
        return fake_logprobs(list(token_ids[first:]), top_k)

    def num_unfinished(self) -> int:
        return 0

    async def shutdown(self) -> None:
        pass
