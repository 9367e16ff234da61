"""Sample intake on a scripted consumer (unit test of one module): dedupe, eval split, verification, references,
dead letters, and replay after a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.common import pb
from services.common.kafka import Received
from services.common.models import load_tokenizer
from services.tasks import parse_checker
from services.trainer.buffer import (
    GENERATED,
    REFERENCE,
    SAMPLE,
    SCORED_REFERENCE,
    SCORED_STUDENT,
    OffsetTracker,
    Replay,
    ReplayBuffer,
    resume_state,
)
from services.trainer.evalset import EvalSet
from services.trainer.intake import Intake, validate_sample
from services.trainer.recipes import with_defaults
from tests.trainer.fakes import ScriptedConsumer

REF = "3 + 5 = 8. The answer is 8."


class DeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []

    def send(self, record: Received[Any], reason: str, error_type: str = "malformed") -> None:
        self.sent.append((record.offset, reason))


def _sample(sid: str, text: str, split: int = pb.common.SPLIT_TRAIN, prompt: str = "p1") -> pb.common.TeacherSample:
    s = pb.common.TeacherSample(
        sample_id=sid, prompt_id=prompt, task="math_word_problems", split=split, completion_text=text, top_k=2,
        reference_answer=REF, teacher_model="t",
    )  # fmt: skip
    s.prompt_token_ids.extend([1, 10, 11, 12])
    s.completion_token_ids.extend([20, 21, 2])
    s.top_ids.extend([20, 30, 21, 31, 2, 32])
    s.top_logprobs.extend([-0.1, -3.0, -0.2, -2.5, -0.05, -4.0])
    s.sampled_logprobs.extend([-0.1, -0.2, -0.05])
    return s


def _record(offset: int, value: pb.common.TeacherSample | None, partition: int = 0) -> Received[Any]:
    raw = value.SerializeToString() if value is not None else b"\xff\xfe"
    error = None if value is not None else "not a valid TeacherSample"
    return Received("samples", partition, offset, b"k", raw, {}, value=value, error=error)


def _intake(
    tiny_teacher: Path, records: list[Received[Any]], verify: int, step: int = 0, **kw: Any
) -> tuple[Intake, DeadLetters]:
    spec = with_defaults(
        pb.trainer.RunSpec(run_id="run-a", checker="numeric",
                           data=pb.trainer.DataFilter(verify=verify, incorrect_weight=0.25),
                           on_policy=pb.trainer.OnPolicySpec(max_staleness_steps=10, drop_stale=kw.pop("drop", False)))
    )  # fmt: skip
    dead = DeadLetters()
    checker = parse_checker("numeric")
    intake = Intake(
        spec, ScriptedConsumer(records), dead, load_tokenizer(tiny_teacher),  # type: ignore[arg-type]
        ReplayBuffer(64, 1), OffsetTracker(), EvalSet(8, 8, checker), checker=checker,
        current_step=lambda: step, **kw,
    )  # fmt: skip
    return intake, dead


STREAM = [
    _sample("a", "8. The answer is 8."),  # correct
    _sample("b", "The answer is 9."),  # wrong
    _sample("a", "8. The answer is 8."),  # duplicate of a
    None,  # undecodable
    _sample("e", "The answer is 8.", split=pb.common.SPLIT_EVAL, prompt="p2"),  # held out
    _sample("c", "The answer is 7.", prompt="p3"),  # wrong, another prompt
]


@pytest.mark.parametrize(
    ("verify", "kept"),
    [
        (pb.trainer.VERIFY_MODE_KEEP_ALL, {"a": 1.0, "b": 1.0, "c": 1.0}),
        (pb.trainer.VERIFY_MODE_KEEP_CORRECT, {"a": 1.0}),
        (pb.trainer.VERIFY_MODE_WEIGHT, {"a": 1.0, "b": 0.25, "c": 0.25}),
    ],
)
def test_verification_dedupe_eval_and_dead_letters(tiny_teacher: Path, verify: int, kept: dict[str, float]) -> None:
    intake, dead = _intake(tiny_teacher, [_record(i, s) for i, s in enumerate(STREAM)], verify)
    assert intake.poll(0.0) == len(STREAM)
    items = intake.buffer.items()
    by_offset = {0: "a", 1: "b", 5: "c"}
    samples = {by_offset[it.offset]: it.weight for it in items if it.kind == SAMPLE}
    assert samples == kept
    # One reference item per train prompt (p1 once, p3 once), whatever the verdict on its samples.
    assert sorted(it.offset for it in items if it.kind == REFERENCE) == [0, 5]
    ref = next(it for it in items if it.kind == REFERENCE)
    tok = load_tokenizer(tiny_teacher)
    assert tok.decode(ref.input_ids[ref.prompt_len :], skip_special_tokens=True) == REF
    assert ref.input_ids[-1] == tok.eos_token_id
    assert dead.sent == [(3, "not a valid TeacherSample")]
    assert intake.stats.duplicate == 1 and intake.stats.eval == 1
    assert [s.sample_id for s in intake.evalset.samples] == ["e"]  # held out, never in the buffer
    assert intake.evalset.teacher_accuracy() == 1.0


def test_prompt_tokens_are_not_targets(tiny_teacher: Path) -> None:
    intake, _ = _intake(tiny_teacher, [_record(0, STREAM[0])], pb.trainer.VERIFY_MODE_KEEP_ALL)
    intake.poll(0.0)
    item = next(it for it in intake.buffer.items() if it.kind == SAMPLE)
    assert item.prompt_len == 4 and item.input_ids[4:] == [20, 21, 2] and item.targets == 3
    assert item.top_ids is not None and item.top_ids.tolist() == [[20, 30], [21, 31], [2, 32]]


def test_replay_after_resume_restores_pending_items_and_skips_done_ones(tiny_teacher: Path) -> None:
    records = [_record(i, s) for i, s in enumerate(STREAM)]
    first, _ = _intake(tiny_teacher, list(records), pb.trainer.VERIFY_MODE_KEEP_ALL)
    first.poll(0.0)
    _, done = first.buffer.take(2, replay=False)  # offset 0's sample and reference are trained
    for it in done:
        first.tracker.done(it.partition, it.offset)
    state = resume_state(first.tracker, first.buffer)
    assert state["safe"] == {"0": 1}
    # Restart: the consumer re-reads from the safe offset.
    second, dead = _intake(
        tiny_teacher, records[1:], pb.trainer.VERIFY_MODE_KEEP_ALL, replay=Replay.from_state(state),
        state=first.state(),
    )  # fmt: skip
    second.poll(0.0)
    assert sorted((it.offset, it.kind) for it in second.buffer.items()) == sorted(
        (it.offset, it.kind) for it in first.buffer.items()
    )
    assert dead.sent == []  # the dead letter was already sent before the checkpoint
    assert second.stats.duplicate == 0  # re-reads are not duplicates


def test_validate_sample_rejects_inconsistent_top_k() -> None:
    bad = _sample("x", "t")
    bad.top_ids.append(5)
    with pytest.raises(ValueError, match="top_k"):
        validate_sample(bad)
    with pytest.raises(ValueError, match="sample_id"):
        validate_sample(pb.common.TeacherSample(prompt_token_ids=[1]))


def _scored(sid: str, source: int, *, run: str = "", step: int = 0, text: str = "The answer is 9.") -> Any:
    s = _sample(sid, text, prompt=f"p-{sid}")
    s.source = source  # type: ignore[assignment]
    s.student_run_id, s.student_step = run, step
    return s


def test_sources_and_verification_only_of_teacher_written_answers(tiny_teacher: Path) -> None:
    """A scored reference or a scored student completion is never filtered by the checker (a wrong student answer
    is exactly what on-policy distillation corrects); a teacher-written wrong answer is, with keep-correct."""
    stream = [
        _scored("g", pb.common.SAMPLE_SOURCE_GENERATED),
        _scored("r", pb.common.SAMPLE_SOURCE_SCORED_REFERENCE),
        _scored("s", pb.common.SAMPLE_SOURCE_SCORED_STUDENT, run="run-a", step=0),
    ]
    intake, _ = _intake(
        tiny_teacher, [_record(i, s) for i, s in enumerate(stream)], pb.trainer.VERIFY_MODE_KEEP_CORRECT
    )
    intake.poll(0.0)
    sources = sorted(it.source for it in intake.buffer.items())
    assert sources == sorted([SCORED_REFERENCE, SCORED_STUDENT, REFERENCE])  # the wrong generated one is filtered
    assert intake.stats.filtered == 1 and intake.stats.on_policy == 1
    student = next(it for it in intake.buffer.items() if it.source == SCORED_STUDENT)
    assert student.on_policy and student.student_step == 0
    # Training prompts (not the student's completions) are remembered for on-policy sampling.
    assert sorted(intake.pool) == ["p-g", "p-r"]


def test_other_runs_and_stale_student_completions(tiny_teacher: Path) -> None:
    stream = [
        _scored("other", pb.common.SAMPLE_SOURCE_SCORED_STUDENT, run="run-b", step=50),
        _scored("stale", pb.common.SAMPLE_SOURCE_SCORED_STUDENT, run="run-a", step=5),
        _scored("fresh", pb.common.SAMPLE_SOURCE_SCORED_STUDENT, run="run-a", step=45),
    ]
    records = [_record(i, s) for i, s in enumerate(stream)]
    kept, _ = _intake(tiny_teacher, list(records), pb.trainer.VERIFY_MODE_KEEP_ALL, step=50)
    kept.poll(0.0)
    assert sorted(it.offset for it in kept.buffer.items()) == [1, 2]  # stale counted, trained on
    assert (kept.stats.on_policy, kept.stats.stale, kept.stats.stale_dropped, kept.stats.filtered) == (2, 1, 0, 1)
    dropped, _ = _intake(tiny_teacher, list(records), pb.trainer.VERIFY_MODE_KEEP_ALL, step=50, drop=True)
    dropped.poll(0.0)
    assert [it.offset for it in dropped.buffer.items()] == [2]
    assert (dropped.stats.stale, dropped.stats.stale_dropped) == (1, 1)
    assert dropped.tracker.safe_offsets() == {0: 2}  # dropped records are done, nothing waits on them
    assert GENERATED not in {it.source for it in dropped.buffer.items()}


def test_a_student_completion_without_its_run_is_refused() -> None:
    with pytest.raises(ValueError, match="student_run_id"):
        validate_sample(_scored("x", pb.common.SAMPLE_SOURCE_SCORED_STUDENT))
