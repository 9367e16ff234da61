"""Where prompts are tokenized (`services.common.prompt_size.off_loop`): short ones at once on the event loop's thread,
longer ones on the tokenizer threads, the largest on the low-priority thread of their own."""

from __future__ import annotations

import threading

import pytest

from services.common import pb
from services.common.prompt_size import INLINE_PROMPT_CHARS, LARGE_PROMPT_CHARS, off_loop, prompt_chars


def where() -> str:
    return threading.current_thread().name


@pytest.mark.parametrize(
    ("chars", "thread"),
    [
        (0, "MainThread"),
        (INLINE_PROMPT_CHARS, "MainThread"),
        (INLINE_PROMPT_CHARS + 1, "tokenize_"),
        (LARGE_PROMPT_CHARS + 1, "tokenize-large_"),
    ],
)
async def test_prompts_are_tokenized_where_their_size_says(chars: int, thread: str) -> None:
    name = await off_loop(where, chars=chars)
    assert name.startswith(thread), name


async def test_an_inline_tokenization_raises_to_the_caller() -> None:
    def fails() -> None:
        raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        await off_loop(fails, chars=10)


def test_a_chat_of_many_empty_messages_is_not_a_short_prompt() -> None:
    """Empty contents still cost the chat template a role marker each: such a chat must not be tokenized on the
    event loop (it would stall every stream and the health check)."""
    empty = [("user", "")] * 100_000
    assert prompt_chars(empty) > LARGE_PROMPT_CHARS
    protos = [pb.common.ChatMessage(role="user", content="")] * 100
    assert prompt_chars(protos) > INLINE_PROMPT_CHARS
    assert prompt_chars([("user", "Tom has 3 apples.")]) <= INLINE_PROMPT_CHARS
    assert prompt_chars("x" * 50) == 50
