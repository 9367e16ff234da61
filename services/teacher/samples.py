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


def sample_id(prompt_id: str, model: str, revision: str, sampling: Sampling, sample_index: int) -> str:
    """Same prompt, teacher, sampling and index → same id, so consumers can drop redelivered duplicates."""
    parts = [prompt_id, model, revision, sampling.canonical(), str(sample_index)]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


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
        sample_id=sample_id(record.prompt_id, info.name, info.revision, sampling, completion.index),
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
    if record.HasField("reference_answer"):
        sample.reference_answer = record.reference_answer
    sample.prompt_token_ids.extend(prompt.token_ids)
    sample.completion_token_ids.extend(completion.token_ids)
    sample.sampled_logprobs.extend(completion.logprobs.sampled)
    sample.top_ids.extend(completion.logprobs.top_ids)
    sample.top_logprobs.extend(completion.logprobs.top_logprobs)
    return sample


def queue_seconds(record_timestamp_ms: int) -> float:
    """How long a prompt waited between being published and being submitted to the engine."""
    if record_timestamp_ms <= 0:
        return 0.0
    return max(0.0, time.time() - record_timestamp_ms / 1000.0)
