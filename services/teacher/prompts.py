"""Prompt records: validation, JSONL parsing, and publishing to the prompts topic (CLI and demo).

One JSONL line is one prompt:
    {"prompt_id": "p1", "messages": [{"role": "user", "content": "…"}], "task": "my_use_case",
     "reference_answer": "8", "split": "train", "sampling": {"temperature": 0.8, "n": 4}}
`text` may replace `messages` (a raw prompt, no chat template). Only `prompt_id` and the content are required.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import pb
from services.common.kafka import ProtoProducer, ensure_topics
from services.common.settings import KafkaSettings
from services.tasks import Content, Example

SPLITS = {
    "": pb.common.SPLIT_UNSPECIFIED,
    "train": pb.common.SPLIT_TRAIN,
    "eval": pb.common.SPLIT_EVAL,
}
FIELDS = {"prompt_id", "messages", "text", "task", "reference_answer", "split", "sampling", "metadata"}


def validate_prompt_record(record: pb.common.PromptRecord) -> None:
    """What the worker needs of a record before it can try it (raises ValueError naming the field)."""
    if not record.prompt_id:
        raise ValueError("prompt_id is empty")
    content = record.WhichOneof("content")
    # A student completion to score carries its own prompt tokens: the content is then optional.
    if content is None and not record.HasField("score_completion"):
        raise ValueError("content is not set: give chat or text (or score_completion)")
    if content == "chat" and not record.chat.messages:
        raise ValueError("chat.messages is empty")


def record_from_json(obj: Any) -> pb.common.PromptRecord:
    """One parsed JSONL object → `PromptRecord`; raises ValueError naming the bad field."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {sorted(FIELDS)}")
    prompt_id = obj.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id:
        raise ValueError(f"prompt_id={prompt_id!r}: must be a non-empty string")
    record = pb.common.PromptRecord(prompt_id=prompt_id, task=str(obj.get("task", "")))
    messages, text = obj.get("messages"), obj.get("text")
    if (messages is None) == (text is None):
        raise ValueError("give exactly one of messages or text")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: must be a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: must be {{'role': str, 'content': str}}")
            record.chat.messages.add(role=m["role"], content=m["content"])
    else:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text: must be a non-empty string")
        record.text = text
    if obj.get("reference_answer") is not None:
        record.reference_answer = str(obj["reference_answer"])
    split = obj.get("split", "")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {sorted(s for s in SPLITS if s)}")
    record.split = SPLITS[split]  # type: ignore[assignment]
    sampling = obj.get("sampling")
    if sampling is not None:
        if not isinstance(sampling, dict):
            raise ValueError("sampling: must be an object")
        sampling = dict(sampling)
        if isinstance(sampling.get("extra"), dict):
            # extra values are JSON text on the wire: accept plain JSON values in the file.
            sampling["extra"] = {k: v if isinstance(v, str) else json.dumps(v) for k, v in sampling["extra"].items()}
        try:
            json_format.ParseDict(sampling, record.sampling)
        except json_format.ParseError as exc:
            raise ValueError(f"sampling: {exc}") from None
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata: must be an object of strings")
    record.metadata.update({str(k): str(v) for k, v in metadata.items()})
    stamp(record)
    return record


def stamp(record: pb.common.PromptRecord) -> pb.common.PromptRecord:
    if not record.HasField("created_at"):
        now = Timestamp()
        now.GetCurrentTime()
        record.created_at.CopyFrom(now)
    return record


@dataclass
class BadLine:
    line: int
    error: str


def read_jsonl(path: Path) -> Iterator[tuple[int, pb.common.PromptRecord | BadLine]]:
    """(line number, record or what is wrong with the line) for every non-blank line."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, record_from_json(json.loads(line))
            except json.JSONDecodeError as exc:
                yield number, BadLine(number, f"not JSON: {exc.msg} at column {exc.colno}")
            except ValueError as exc:
                yield number, BadLine(number, str(exc))


def publish(
    kafka: KafkaSettings,
    records: Iterable[pb.common.PromptRecord],
    on_sent: Callable[[pb.common.PromptRecord], None] | None = None,
    producer: ProtoProducer | None = None,
) -> int:
    """Sends records to the prompts topic (key = prompt_id) and waits for the broker's acks; returns the count."""
    ensure_topics(kafka, [kafka.topic_prompts])
    own = producer is None
    producer = producer or ProtoProducer(kafka, "prompts-publisher")
    sent = 0
    try:
        for record in records:
            validate_prompt_record(record)
            producer.send(kafka.topic_prompts, record.prompt_id, stamp(record))
            sent += 1
            if on_sent is not None:
                on_sent(record)
        producer.flush()
    finally:
        if own:
            producer.close()
    return sent


def example_record(
    example: Example,
    task: str,
    sampling: pb.common.SamplingParams | None = None,
    *,
    content: Content | None = None,
    variant: str = "",
    score_reference: bool = False,
) -> pb.common.PromptRecord:
    """A prompt of a JSONL prompts file (`services.tasks.dataset`) as a prompt record: its chat or text (or another
    phrasing of it, `content` named `variant`), reference answer, split and metadata."""
    record = pb.common.PromptRecord(
        prompt_id=example.id,
        task=task,
        split=SPLITS.get(example.split or "", pb.common.SPLIT_UNSPECIFIED),  # type: ignore[arg-type]
        prompt_variant=variant,
        score_reference=score_reference,
        metadata=example.metadata,
    )
    content = content or example.content
    if content.messages:
        for role, text in content.messages:
            record.chat.messages.add(role=role, content=text)
    else:
        record.text = content.prompt
    if example.reference is not None:
        record.reference_answer = example.reference
    if sampling is not None:
        record.sampling.CopyFrom(sampling)
    return stamp(record)
