"""What a prompt record asks the teacher to score instead of generating: its reference answer or a student's
completion, checked against the model before the prefill."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common import pb
from services.common.errors import InvalidArgument
from services.teacher.engine import Prompt, TeacherEngine
from services.teacher.inputs import check_length, check_token_ids, record_prompt


@dataclass(frozen=True)
class ScoreTarget:
    """A prompt and the completion after it whose tokens the teacher scores in one prefill."""

    prompt: Prompt
    token_ids: list[int]
    text: str


def score_target(engine: TeacherEngine, record: pb.common.PromptRecord) -> ScoreTarget | None:
    """The completion `record` asks the teacher to score, validated; None when it asks for generation."""
    student = record.HasField("score_completion")
    if not student and not record.score_reference:
        return None
    if student and record.score_reference:
        raise InvalidArgument("score_reference", True, "set score_reference or score_completion, not both")
    target = _student(engine, record.score_completion) if student else _reference(engine, record)
    # Prompt and completion go to vLLM as one prompt for a one-token request, so one context slot stays free.
    tokens = len(target.prompt.token_ids) + len(target.token_ids)
    check_length(engine, tokens, "score_completion" if student else "reference_answer")
    return target


def _reference(engine: TeacherEngine, record: pb.common.PromptRecord) -> ScoreTarget:
    prompt = record_prompt(engine, record)
    if not record.HasField("reference_answer") or not record.reference_answer.strip():
        raise InvalidArgument("reference_answer", "", "score_reference needs a reference answer to score")
    return ScoreTarget(prompt, engine.encode_completion(record.reference_answer), record.reference_answer)


def _student(engine: TeacherEngine, completion: pb.common.StudentCompletion) -> ScoreTarget:
    vocab_size = engine.info.vocab_size
    prompt_ids = _token_ids("score_completion.prompt_token_ids", completion.prompt_token_ids, vocab_size)
    completion_ids = _token_ids("score_completion.completion_token_ids", completion.completion_token_ids, vocab_size)
    # The student's own prompt tokens are scored as given: re-rendering the record's content could tokenize
    # differently, and the teacher must condition on exactly what the student saw. (The text is for reading only.)
    prompt = Prompt(engine.decode(prompt_ids), prompt_ids)
    return ScoreTarget(prompt, completion_ids, engine.decode(completion_ids))


def _token_ids(where: str, ids: Sequence[int], vocab_size: int) -> list[int]:
    if not ids:
        raise InvalidArgument(where, [], "empty: the student's tokens are required")
    check_token_ids(where, ids, vocab_size)
    return list(ids)
