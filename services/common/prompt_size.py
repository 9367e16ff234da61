"""Prompt size limits checked before any tokenization, and tokenization on threads of its own.

A tokenizer takes seconds on a 20 MB prompt: run on the event loop, it stalls every other stream and the health
check. Sizes are checked first (characters, then UTF-8 bytes: both cheap), and tokenizers run on threads (a short
prompt costs less to tokenize than the hand-off to a thread: it is tokenized at once, `INLINE_PROMPT_CHARS`). Large
prompts get one thread of their own at the lowest CPU priority (where the engine's threads use every core, a
tokenizer at equal priority slows every stream's steps while it runs): they queue behind each other and never delay
the small prompts of other streams, which get two threads. A fast tokenizer is shared by these threads only for
encoding, which borrows it read-only (truncation and padding are never set on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.errors import ResourceExhausted

T = TypeVar("T")

#: Prompts up to this many characters are tokenized on the calling (event-loop) thread: the default tokenizer with
#: its chat template takes ≈80 µs at 60 characters and ≈0.25 ms at 1,000, less than handing the work to a thread and
#: back costs (measured: the hop was 11% of the serving process's CPU at 256 streams of 48 tokens).
INLINE_PROMPT_CHARS = 1_024
#: Prompts longer than this (in characters) are tokenized on the large-prompt thread.
LARGE_PROMPT_CHARS = 16_384
_SMALL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")


def _lowest_priority() -> None:
    """Nice 19 for the calling thread (Linux schedules threads individually; lowering one's own needs no rights)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


_LARGE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize-large", initializer=_lowest_priority)


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


#: What a chat message costs its tokenizer beyond its content (the template's role markers), in characters: a chat of
#: a million empty messages is a large prompt, not an empty one.
MESSAGE_CHARS = 32


def prompt_chars(prompt: str | Sequence[Any]) -> int:
    """Characters of a prompt text, or of a chat's contents ((role, content) pairs or ChatMessage protos) plus
    `MESSAGE_CHARS` a message: the work its tokenization takes, for `off_loop`."""
    if isinstance(prompt, str):
        return len(prompt)
    total = 0
    for message in prompt:
        content: Any = message[1] if isinstance(message, tuple) else getattr(message, "content", "")
        total += len(content) + MESSAGE_CHARS
    return total


async def off_loop(fn: Callable[..., T], *args: Any, chars: int = 0, **kwargs: Any) -> T:
    """Runs `fn` (a tokenization of a prompt of `chars` characters) on a tokenizer thread and awaits it; a prompt of
    at most `INLINE_PROMPT_CHARS` characters is tokenized at once, on the caller's thread."""
    if chars <= INLINE_PROMPT_CHARS:
        return fn(*args, **kwargs)
    pool = _LARGE if chars > LARGE_PROMPT_CHARS else _SMALL
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))
