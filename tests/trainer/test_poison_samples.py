"""Poison teacher samples (unit test of the intake with its real decoder, on a scripted consumer): every kind is a
dead letter with a reason, and the good records after it are taken for training."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.common import pb
from services.common.kafka import Received, decode, schema_headers
from services.common.models import load_tokenizer
from services.trainer.buffer import SAMPLE, OffsetTracker, ReplayBuffer
from services.trainer.evalset import EvalSet
from services.trainer.intake import Intake, sample_validator
from services.trainer.recipes import with_defaults
from tests.trainer.fakes import ScriptedConsumer

VOCAB = 512  # the tiny teacher's


class DeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[int, str, str]] = []

    def send(self, record: Received[Any], reason: str, error_type: str = "malformed") -> None:
        self.sent.append((record.offset, reason, error_type))


def good(sid: str) -> pb.common.TeacherSample:
    s = pb.common.TeacherSample(sample_id=sid, prompt_id=f"p-{sid}", task="t", split=pb.common.SPLIT_TRAIN, top_k=2)
    s.prompt_token_ids.extend([1, 10, 11, 12])
    s.completion_token_ids.extend([20, 21, 2])
    s.sampled_logprobs.extend([-0.1, -0.2, -0.05])
    s.top_ids.extend([20, 30, 21, 31, 2, 32])
    s.top_logprobs.extend([-0.1, -3.0, -0.2, -2.5, -0.05, -4.0])
    return s


def poisoned(change: Callable[[pb.common.TeacherSample], None]) -> pb.common.TeacherSample:
    s = good("poison")
    change(s)
    return s


def _set(field: str, values: list[Any]) -> Callable[[pb.common.TeacherSample], None]:
    def change(s: pb.common.TeacherSample) -> None:
        s.ClearField(field)  # type: ignore[arg-type]
        getattr(s, field).extend(values)

    return change


def _top_k_zero(s: pb.common.TeacherSample) -> None:
    s.top_k = 0
    s.ClearField("top_ids")
    s.ClearField("top_logprobs")
    s.ClearField("sampled_logprobs")


HEADERS = dict((k, v.decode()) for k, v in schema_headers(pb.common.TeacherSample()))

# (name, raw bytes, headers, expected error_type, a word the reason must hold)
POISON: list[tuple[str, bytes, dict[str, str], str, str]] = [
    ("oov completion id", poisoned(_set("completion_token_ids", [20, VOCAB + 88, 2])).SerializeToString(), HEADERS,
     "invalid", f"completion_token_ids holds token id {VOCAB + 88}"),
    ("oov prompt id", poisoned(_set("prompt_token_ids", [1, 70_000])).SerializeToString(), HEADERS,
     "invalid", "prompt_token_ids holds token id 70000"),
    ("oov top-k id", poisoned(_set("top_ids", [20, 30, 21, VOCAB, 2, 32])).SerializeToString(), HEADERS,
     "invalid", "top_ids holds token id"),
    ("negative id", poisoned(_set("completion_token_ids", [20, -3, 2])).SerializeToString(), HEADERS,
     "invalid", "negative token id"),
    ("nan top logprob", poisoned(_set("top_logprobs", [-0.1, math.nan, -0.2, -2.5, -0.05, -4.0])).SerializeToString(),
     HEADERS, "invalid", "non-finite"),
    ("inf top logprob", poisoned(_set("top_logprobs", [-0.1, -math.inf, -0.2, -2.5, -0.05, -4.0])).SerializeToString(),
     HEADERS, "invalid", "non-finite"),
    ("positive logprob", poisoned(_set("top_logprobs", [0.5, -3.0, -0.2, -2.5, -0.05, -4.0])).SerializeToString(),
     HEADERS, "invalid", "above 0"),
    ("all-equal logprobs", poisoned(_set("top_logprobs", [-0.01] * 6)).SerializeToString(), HEADERS,
     "invalid", "sum to probability"),
    ("nan sampled logprob", poisoned(_set("sampled_logprobs", [-0.1, math.nan, -0.1])).SerializeToString(), HEADERS,
     "invalid", "sampled_logprobs holds a non-finite"),
    ("empty sampled logprobs", poisoned(_set("sampled_logprobs", [])).SerializeToString(), HEADERS,
     "invalid", "sampled_logprobs has 0 values for 3"),
    ("misaligned top-k", poisoned(_set("top_ids", [20, 30, 21])).SerializeToString(), HEADERS, "invalid", "top_k=2"),
    ("top_k=0", poisoned(_top_k_zero).SerializeToString(), HEADERS, "invalid", "top_k=0"),
    ("no schema header", good("headless").SerializeToString(), {}, "schema", "no 'schema' header"),
    ("another message type",
     pb.common.CheckpointEvent(run_id="r", version=3, registry_uri="file:///x").SerializeToString(),
     dict((k, v.decode()) for k, v in schema_headers(pb.common.CheckpointEvent())), "schema", "CheckpointEvent"),
    ("not protobuf", b"\x0a\xff\xff\xff\x0f", HEADERS, "malformed", "not a valid"),
]  # fmt: skip


def _intake(tiny_teacher: Path, records: list[Received[Any]]) -> tuple[Intake, DeadLetters]:
    spec = with_defaults(pb.trainer.RunSpec(run_id="run-a"))
    dead = DeadLetters()
    intake = Intake(
        spec, ScriptedConsumer(records), dead, load_tokenizer(tiny_teacher),  # type: ignore[arg-type]
        ReplayBuffer(256, 1), OffsetTracker(), EvalSet(8, 8, None),
    )  # fmt: skip
    return intake, dead


def _received(offset: int, raw: bytes, headers: dict[str, str], validate: Any) -> Received[Any]:
    value, error, kind = decode(pb.common.TeacherSample, raw, headers, validate)
    return Received("samples", 0, offset, b"k", raw, headers, value=value, error=error, error_type=kind)


def test_the_default_spec_needs_top_k() -> None:
    from services.trainer.intake import needs_top_k

    assert needs_top_k(with_defaults(pb.trainer.RunSpec()))


@pytest.mark.parametrize(("name", "raw", "headers", "kind", "reason"), POISON, ids=[p[0] for p in POISON])
def test_a_poison_sample_is_a_dead_letter_and_the_next_one_is_trained(
    tiny_teacher: Path, name: str, raw: bytes, headers: dict[str, str], kind: str, reason: str
) -> None:
    validate = sample_validator(VOCAB, require_top_k=True)
    before, after = good("before"), good("after")
    records = [
        _received(0, before.SerializeToString(), HEADERS, validate),
        _received(1, raw, headers, validate),
        _received(2, after.SerializeToString(), HEADERS, validate),
    ]
    intake, dead = _intake(tiny_teacher, records)
    assert intake.poll(0.0) == 3
    assert len(dead.sent) == 1, dead.sent
    offset, why, error_type = dead.sent[0]
    assert (offset, error_type) == (1, kind)
    assert reason in why
    assert sorted(it.offset for it in intake.buffer.items() if it.kind == SAMPLE) == [0, 2]
    assert intake.tracker.safe_offsets() == {0: 0}  # the poison record is done; the good ones wait for training
    assert intake.stats.dead_letter == 1 and intake.stats.filtered == 0


def test_the_teachers_own_samples_pass(tiny_samples: list[Any]) -> None:
    validate = sample_validator(VOCAB, require_top_k=True)
    for sample in tiny_samples:
        validate(sample)
