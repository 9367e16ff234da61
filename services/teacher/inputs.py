"""Prompt validation shared by the gRPC servicer and the Kafka worker: chat or text in, a model-ready `Prompt` out."""

from __future__ import annotations

from collections.abc import Sequence

from services.common import pb
from services.common.errors import InvalidArgument
from services.common.prompt_size import PromptSize, check_prompt_size
from services.teacher.engine import Prompt, TeacherEngine

ROLES = ("system", "user", "assistant")


def chat_messages(messages: Sequence[pb.common.ChatMessage], where: str = "messages") -> list[dict[str, str]]:
    """Proto chat messages → template input; refuses unknown roles and conversations with no content."""
    out = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidArgument(f"{where}[{i}].role", message.role, f"must be one of {', '.join(ROLES)}")
        out.append({"role": message.role, "content": message.content})
    if not any(m["content"].strip() for m in out):
        raise InvalidArgument(where, "", "empty prompt: no message has content")
    return out


def render_prompt(
    engine: TeacherEngine,
    messages: Sequence[pb.common.ChatMessage],
    text: str,
    *,
    messages_field: str = "messages",
    text_field: str = "prompt",
    reserve: int = 1,
) -> tuple[Prompt, str]:
    """Exactly one of chat `messages` or raw `text` → (`Prompt`, the field it came from).

    `reserve` tokens must stay free in the context after the prompt (at least one to generate).
    """
    if messages and text:
        raise InvalidArgument(text_field, _short(text), f"give {messages_field} or {text_field}, not both")
    if messages:
        prompt, where = engine.render(messages=chat_messages(messages, messages_field)), messages_field
    elif text.strip():
        prompt, where = engine.render(text=text), text_field
    else:
        raise InvalidArgument(text_field, text, f"empty prompt: give {messages_field} or {text_field}")
    check_length(engine, len(prompt.token_ids), where, reserve)
    return prompt, where


def check_size(messages: Sequence[pb.common.ChatMessage], text: str, size: PromptSize) -> None:
    """The size limits, checked before anything is tokenized (ResourceExhausted naming the largest field)."""
    parts = [(f"messages[{i}].content", m.content) for i, m in enumerate(messages)]
    check_prompt_size([*parts, ("prompt", text)] if text else parts, size)


def record_prompt(engine: TeacherEngine, record: pb.common.PromptRecord) -> Prompt:
    """A prompt record's chat or text content → `Prompt` (errors name the record's fields)."""
    content = record.WhichOneof("content")
    prompt, _ = render_prompt(
        engine,
        record.chat.messages if content == "chat" else [],
        record.text if content == "text" else "",
        messages_field="chat.messages",
        text_field="text",
    )
    return prompt


def check_token_ids(where: str, ids: Sequence[int], vocab_size: int) -> None:
    for i, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise InvalidArgument(f"{where}[{i}]", token, f"not a token id of this model (vocab size {vocab_size})")


def check_length(engine: TeacherEngine, tokens: int, where: str, reserve: int = 1) -> None:
    limit = engine.info.max_model_len - reserve
    if tokens > limit:
        raise InvalidArgument(
            where,
            f"{tokens} tokens",
            f"longer than the model context allows: at most {limit} tokens (max_model_len={engine.info.max_model_len})",
        )


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
