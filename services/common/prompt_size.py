"""Prompt size limits checked before any tokenization, and tokenization on a thread of its own.

A tokenizer takes seconds on a 20 MB prompt: run on the event loop, it stalls every other stream and the health
check. Sizes are checked first (characters, then UTF-8 bytes: both cheap), and the tokenizer runs on one dedicated
thread, so the event loop keeps answering (one thread: a Hugging Face fast tokenizer is not safe to call
concurrently, and one large prompt then delays only other tokenizations, never the streams already running).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.errors import ResourceExhausted

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")


@dataclass(frozen=True)
class PromptSize:
    """Largest prompt a request may send, summed over its prompt text or chat message contents."""

    max_chars: int = 100_000
    max_bytes: int = 400_000


def check_prompt_size(parts: Sequence[tuple[str, str]], limit: PromptSize) -> None:
    """`parts` are (field, text) pairs; raises ResourceExhausted naming the largest field when over a limit."""
    if not parts:
        return
    chars = sum(len(text) for _, text in parts)
    largest = max(parts, key=lambda part: len(part[1]))[0]
    if chars > limit.max_chars:
        raise ResourceExhausted(f"{largest}: the prompt is {chars} characters; the limit is {limit.max_chars} "
                                "(max_prompt_chars)")  # fmt: skip
    size = sum(len(text.encode("utf-8", "surrogatepass")) for _, text in parts)
    if size > limit.max_bytes:
        raise ResourceExhausted(f"{largest}: the prompt is {size} bytes of UTF-8; the limit is {limit.max_bytes} "
                                "(max_prompt_bytes)")  # fmt: skip


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs `fn` (a tokenization) on the tokenizer thread and awaits it."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args, **kwargs))
