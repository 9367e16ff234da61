"""Teacher samples: completions collected from engine chunks, deterministic sample ids, `TeacherSample` records."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from services.common import pb
from services.teacher.engine import Chunk, FinishReason, Logprobs, ModelInfo, Prompt
from services.teacher.sampling import Sampling
from services.teacher.servicer import FINISH_REASONS


def sample_id(
    prompt_id: str, model: str, revision: str, sampling: Sampling, sample_index: int, prompt_variant: str = ""
) -> str:
    """Same prompt (and variant), teacher, sampling and index → same id, so consumers can drop redelivered
    duplicates."""
    parts = [prompt_id, model, revision, sampling.canonical(), str(sample_index)]
    # Only when set: records without a variant keep the ids they had before variants existed.
    if prompt_variant:
        parts.append(prompt_variant)
    return _digest(parts)


def student_sample_id(
    prompt_id: str, model: str, revision: str, completion: pb.common.StudentCompletion, prompt_variant: str = ""
) -> str:
    """Same prompt, teacher, student run, step and completion tokens → same id: a redelivered record dedupes, and
    two different completions never share an id. Sampling is left out: it sets only k, not what is scored."""
    tokens = ",".join(map(str, completion.completion_token_ids))
    # The leading tag keeps these ids apart from generated ones whatever the other parts hold.
    parts = ["scored_student", prompt_id, model, revision, completion.run_id, str(completion.student_step), tokens]
    if prompt_variant:
        parts.append(prompt_variant)
    return _digest(parts)


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def sample_source(record: pb.common.PromptRecord) -> pb.common.SampleSource.ValueType:
    if record.HasField("score_completion"):
        return pb.common.SAMPLE_SOURCE_SCORED_STUDENT
    if record.score_reference:
        return pb.common.SAMPLE_SOURCE_SCORED_REFERENCE
    return pb.common.SAMPLE_SOURCE_GENERATED


@dataclass
class Completion:
    """One of the n completions of a request, assembled from its chunks."""

    index: int
    logprobs: Logprobs
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    first_token_s: float | None = None
    total_s: float = 0.0

    def add(self, chunk: Chunk, elapsed_s: float) -> None:
        if chunk.token_ids and self.first_token_s is None:
            self.first_token_s = elapsed_s
        self.token_ids.extend(chunk.token_ids)
        self.text += chunk.text
        self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.total_s = elapsed_s


def build_sample(
    record: pb.common.PromptRecord,
    prompt: Prompt,
    completion: Completion,
    sampling: Sampling,
    info: ModelInfo,
    queue_s: float,
) -> pb.common.TeacherSample:
    finished_at = Timestamp()
    finished_at.GetCurrentTime()
    sample = pb.common.TeacherSample(
        sample_id=_record_sample_id(record, info, sampling, completion.index),
        prompt_id=record.prompt_id,
        task=record.task,
        split=record.split,
        teacher_model=info.name,
        teacher_revision=info.revision,
        completion_text=completion.text,
        top_k=completion.logprobs.top_k,
        finish_reason=FINISH_REASONS[completion.finish_reason],  # type: ignore[arg-type]
        sampling=sampling.to_proto(),
        timings=pb.common.Timings(
            queue_s=queue_s,
            time_to_first_token_s=completion.first_token_s or 0.0,
            total_s=completion.total_s,
            finished_at=finished_at,
        ),
        sample_index=completion.index,
        prompt_text=prompt.text,
    )
    _set_provenance(sample, record)
    if record.HasField("reference_answer"):
        sample.reference_answer = record.reference_answer
    sample.prompt_token_ids.extend(prompt.token_ids)
    sample.completion_token_ids.extend(completion.token_ids)
    sample.sampled_logprobs.extend(completion.logprobs.sampled)
    sample.top_ids.extend(completion.logprobs.top_ids)
    sample.top_logprobs.extend(completion.logprobs.top_logprobs)
    return sample


def _record_sample_id(record: pb.common.PromptRecord, info: ModelInfo, sampling: Sampling, index: int) -> str:
    if record.HasField("score_completion"):
        return student_sample_id(
            record.prompt_id, info.name, info.revision, record.score_completion, record.prompt_variant
        )
    return sample_id(record.prompt_id, info.name, info.revision, sampling, index, record.prompt_variant)


def _set_provenance(sample: pb.common.TeacherSample, record: pb.common.PromptRecord) -> None:
    """Where the completion came from, so the trainer can tell distillation, reference and on-policy data apart."""
    sample.source = sample_source(record)
    sample.prompt_variant = record.prompt_variant
    # Older consumers only know the bool.
    sample.scored_reference = sample.source == pb.common.SAMPLE_SOURCE_SCORED_REFERENCE
    if sample.source == pb.common.SAMPLE_SOURCE_SCORED_STUDENT:
        sample.student_run_id = record.score_completion.run_id
        sample.student_step = record.score_completion.student_step


def queue_seconds(record_timestamp_ms: int) -> float:
    """How long a prompt waited between being published and being submitted to the engine."""
    if record_timestamp_ms <= 0:
        return 0.0
    return max(0.0, time.time() - record_timestamp_ms / 1000.0)
