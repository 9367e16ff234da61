"""Quoting caller-supplied values in error messages and log lines: always bounded, always one line."""

from __future__ import annotations

#: At most this many characters of a quoted value reach a message or a log line.
QUOTE_CHARS = 120


def clip(value: object, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` (for strings and bytes) or `str(value)`, cut to `limit` characters with the original length
    noted, so a 2 MB field never becomes a 2 MB error message or log line."""
    text = repr(value) if isinstance(value, str | bytes) else str(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes | list | tuple | dict) else len(text)
    return f"{text[:limit]}… ({size} long)"


def clip_message(message: str, limit: int = 1000) -> str:
    """A whole message (which may already quote several values) cut to `limit` characters."""
    return message if len(message) <= limit else f"{message[:limit]}… ({len(message)} characters)"
