"""On-policy distillation over Kafka: the student samples, the teacher scores, the student learns from its own text.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models", arXiv:2306.13649) and MiniLLM (Gu et al.
2024) train the student on sequences it generates itself, with the teacher's distribution at every token as the
target: the student sees and corrects its own mistakes instead of only imitating text it would not write
(exposure bias). Here a round is:

    trainer: sample completions from the current student (transformers, temperature T) on training prompts
      → PromptRecord{score_completion} on the prompts topic (key = prompt id)
    teacher (any replica): one prefill over prompt + completion → its top-k at every student token
      → TeacherSample{source = SCORED_STUDENT, student_run_id, student_step} on the samples topic
    trainer intake: this run's scored completions, stale ones counted (and dropped when asked), become on-policy
      items; `OnPolicySpec.fraction` of each batch comes from them, trained with `OnPolicySpec.loss` (reverse KL).

Every `refresh_every_steps` steps a round of `prompts_per_refresh` completions is sent; the student's step rides
along so the intake can tell how stale a completion is when it comes back.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import torch
from google.protobuf.timestamp_pb2 import Timestamp
from kafka.errors import KafkaError

from services.common import pb
from services.common.kafka import ProtoProducer
from services.trainer import metrics
from services.trainer.generation import complete
from services.trainer.intake import PoolPrompt

logger = logging.getLogger(__name__)


class OnPolicySampler:
    def __init__(
        self, spec: pb.trainer.RunSpec, producer: ProtoProducer, topic: str, ack_timeout_s: float, seed: int
    ) -> None:
        self.spec = spec
        self.on_policy = spec.on_policy
        self.producer = producer
        self.topic = topic
        self.ack_timeout_s = ack_timeout_s
        self.rng = random.Random(seed)
        self.requested = 0
        self.last_round_step: int | None = None

    @property
    def enabled(self) -> bool:
        return self.on_policy.fraction > 0

    def due(self, step: int) -> bool:
        if not self.enabled:
            return False
        return self.last_round_step is None or step - self.last_round_step >= self.on_policy.refresh_every_steps

    def round(
        self, model: Any, tokenizer: Any, pool: list[PoolPrompt], step: int, device: torch.device, autocast: bool
    ) -> int:
        """Samples completions of up to `prompts_per_refresh` pool prompts and sends them to be scored; returns how
        many were sent (0 while the pool is empty: the next step tries again)."""
        if not pool:
            return 0
        self.last_round_step = step
        chosen = self.rng.sample(pool, min(self.on_policy.prompts_per_refresh, len(pool)))
        started = time.monotonic()
        completions = sample_completions(
            model, tokenizer, [p.prompt_token_ids for p in chosen], self.on_policy.max_new_tokens,
            self.on_policy.temperature, autocast, device,
        )  # fmt: skip
        sent = []
        for prompt, completion in zip(chosen, completions, strict=True):
            if not completion:
                continue
            record = score_request(prompt, completion, self.spec.run_id, step)
            sent.append((prompt.prompt_id, record, self.producer.send(self.topic, prompt.prompt_id, record)))
        for key, record, future in sent:
            try:
                future.get(timeout=self.ack_timeout_s)
            except KafkaError:
                # A broker restart: resent on a rebuilt producer; acknowledged, or the run fails loudly.
                self.producer.send_and_wait(self.topic, key, record, timeout_s=self.ack_timeout_s)
        self.requested += len(sent)
        metrics.ON_POLICY.labels("requested").inc(len(sent))
        logger.info(
            "on-policy round",
            extra={"run_id": self.spec.run_id, "step": step, "sent": len(sent),
                   "seconds": round(time.monotonic() - started, 2)},
        )  # fmt: skip
        return len(sent)


def score_request(prompt: PoolPrompt, completion: list[int], run_id: str, step: int) -> pb.common.PromptRecord:
    """The prompts-topic record asking a teacher to score a student completion."""
    created = Timestamp()
    created.GetCurrentTime()
    return pb.common.PromptRecord(
        prompt_id=prompt.prompt_id,
        task=prompt.task,
        split=pb.common.SPLIT_TRAIN,
        sampling=pb.common.SamplingParams(logprobs=prompt.top_k),
        score_completion=pb.common.StudentCompletion(
            prompt_token_ids=prompt.prompt_token_ids,
            completion_token_ids=completion,
            run_id=run_id,
            student_step=step,
        ),
        created_at=created,
    )


def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    autocast: bool,
    device: torch.device,
) -> list[list[int]]:
    """The student's sampled completion of each prompt, up to and including its end-of-sequence token (kept: the
    teacher's view of stopping there is signal too)."""
    was_training = model.training
    model.eval()
    try:
        return complete(model, tokenizer, prompts, max_new_tokens, autocast, device, temperature=temperature)
    finally:
        model.train(was_training)
