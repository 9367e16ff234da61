"""Sample intake: teacher-sample records from Kafka → training items in the replay buffer, or the eval set.

Per record, in order: undecodable or inconsistent → dead-letter topic (the run goes on); re-read after a resume →
restored from the checkpoint's pending list or skipped as done; duplicate `sample_id` → dropped; eval split →
held-out set; scored student completions of another run, or staler than the on-policy limit (when it drops them)
→ dropped and counted; task filter, truncation filter, verification of teacher-written completions by the run's
checker (keep correct / keep all / weight) → a teacher item; the first sample of a prompt with a reference answer
also yields a reference item (SFT on the worked solution) when the spec weighs `reference_ce`. Training prompts
(their primary phrasing) are remembered for on-policy sampling. The offset tracker learns how many items each
record produced.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common import pb
from services.common.kafka import DeadLetterWriter, ProtoConsumer, Received
from services.tasks import Checker
from services.trainer import metrics
from services.trainer.buffer import (
    GENERATED,
    REFERENCE,
    SAMPLE,
    SCORED_REFERENCE,
    SCORED_STUDENT,
    Item,
    OffsetTracker,
    Replay,
    ReplayBuffer,
)
from services.trainer.evalset import PRIMARY, EvalSet

logger = logging.getLogger(__name__)

SEEN_LIMIT = 200_000
#: Training prompts remembered for on-policy sampling (the most recent ones).
PROMPT_POOL_LIMIT = 4096


def source_of(sample: pb.common.TeacherSample) -> str:
    """The sample's signal source; samples from before `source` existed are generated or scored references."""
    if sample.source == pb.common.SAMPLE_SOURCE_SCORED_STUDENT:
        return SCORED_STUDENT
    if sample.source == pb.common.SAMPLE_SOURCE_SCORED_REFERENCE or sample.scored_reference:
        return SCORED_REFERENCE
    return GENERATED


#: Slack on "a log-probability is <= 0" and "top-k probabilities sum to <= 1": float32 rounding in the teacher's
#: log-softmax gives values a few ulps above the bound, never more.
LOGPROB_SLACK = 1e-3


def validate_sample(
    sample: pb.common.TeacherSample, vocab_size: int | None = None, require_top_k: bool = False
) -> None:
    """Checks the decoder applies; a failing record goes to the dead-letter topic with the message as its reason.

    Structure (ids present, top-k arrays of top_k × completion length, sampled logprobs one per completion token
    when the sample carries top-k), values (every token id in [0, vocab_size) of the run's tokenizer and student
    embedding — the vocabulary is never pruned —, every logprob finite and <= 0, a position's top-k probabilities
    summing to <= 1), and `require_top_k`: a train-split sample without top-k when the run's loss needs it.
    """
    if not sample.sample_id:
        raise ValueError("sample_id is empty")
    if not sample.prompt_token_ids:
        raise ValueError("prompt_token_ids is empty")
    n = len(sample.completion_token_ids)
    k = sample.top_k
    if len(sample.top_ids) != k * n or len(sample.top_logprobs) != k * n:
        raise ValueError(
            f"top_k={k} × {n} completion tokens needs {k * n} top ids/logprobs, "
            f"got {len(sample.top_ids)}/{len(sample.top_logprobs)}"
        )
    if sample.source == pb.common.SAMPLE_SOURCE_SCORED_STUDENT and not sample.student_run_id:
        raise ValueError("a scored student completion without student_run_id")
    if k == 0 and n and sample.split != pb.common.SPLIT_EVAL:
        if require_top_k:
            raise ValueError("top_k=0: the run's loss needs the teacher's top-k log-probs")
        if sample.source == pb.common.SAMPLE_SOURCE_SCORED_STUDENT:
            raise ValueError("top_k=0 on a scored student completion: on-policy distillation needs the top-k")
    if k and len(sample.sampled_logprobs) != n:
        raise ValueError(f"sampled_logprobs has {len(sample.sampled_logprobs)} values for {n} completion tokens")
    for name in ("prompt_token_ids", "completion_token_ids", "top_ids"):
        ids = np.asarray(getattr(sample, name), dtype=np.int64)
        if ids.size == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0:
            raise ValueError(f"{name} holds a negative token id {low}")
        if vocab_size is not None and high >= vocab_size:
            raise ValueError(f"{name} holds token id {high}, outside the vocabulary of {vocab_size}")
    for name in ("top_logprobs", "sampled_logprobs"):
        values = np.asarray(getattr(sample, name), dtype=np.float64)
        if values.size == 0:
            continue
        if not np.isfinite(values).all():
            raise ValueError(f"{name} holds a non-finite value {values[~np.isfinite(values)][0]}")
        if values.max() > LOGPROB_SLACK:
            raise ValueError(f"{name} holds {values.max():.4g}, a log-probability above 0")
    if k and n:
        mass = np.exp(np.asarray(sample.top_logprobs, dtype=np.float64).reshape(n, k)).sum(axis=1)
        if mass.max() > 1 + LOGPROB_SLACK:
            pos = int(mass.argmax())
            raise ValueError(f"top_logprobs at completion position {pos} sum to probability {mass[pos]:.4g} > 1")


def sample_validator(vocab_size: int, require_top_k: bool) -> Callable[[pb.common.TeacherSample], None]:
    """`validate_sample` bound to a run's vocabulary and loss (the consumer's decoder calls it per record)."""

    def validate(sample: pb.common.TeacherSample) -> None:
        validate_sample(sample, vocab_size, require_top_k)

    return validate


def needs_top_k(spec: pb.trainer.RunSpec) -> bool:
    """True when the run's off-policy loss has a term that reads the teacher's top-k."""
    return any(getattr(spec.loss, w) > 0 for w in ("forward_kl", "reverse_kl", "jsd", "skew_kl"))


class BoundedSet:
    """Insertion-ordered set that forgets its oldest members past `limit` (duplicates arrive close together)."""

    def __init__(self, limit: int = SEEN_LIMIT, items: list[str] | None = None) -> None:
        self.limit = limit
        self._d: OrderedDict[str, None] = OrderedDict((k, None) for k in (items or []))

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def add(self, key: str) -> None:
        self._d[key] = None
        if len(self._d) > self.limit:
            self._d.popitem(last=False)

    def to_list(self) -> list[str]:
        return list(self._d)


@dataclass
class IntakeStats:
    read: int = 0
    accepted: int = 0
    duplicate: int = 0
    filtered: int = 0
    dead_letter: int = 0
    eval: int = 0
    #: Scored student completions of this run received, and those older than max_staleness_steps (and dropped).
    on_policy: int = 0
    stale: int = 0
    stale_dropped: int = 0


@dataclass
class PoolPrompt:
    """A training prompt the student can be asked on-policy: token ids of its primary phrasing, and the teacher's
    top-k width on it (what its scored completions will carry)."""

    prompt_id: str
    prompt_token_ids: list[int]
    task: str
    top_k: int


class Intake:
    def __init__(
        self,
        spec: pb.trainer.RunSpec,
        consumer: ProtoConsumer[pb.common.TeacherSample],
        dead_letters: DeadLetterWriter,
        tokenizer: Any,
        buffer: ReplayBuffer,
        tracker: OffsetTracker,
        evalset: EvalSet,
        replay: Replay | None = None,
        state: dict[str, Any] | None = None,
        checker: Checker | None = None,
        current_step: Any = None,
    ) -> None:
        self.spec = spec
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.tokenizer = tokenizer
        self.buffer = buffer
        self.tracker = tracker
        self.evalset = evalset
        self.replay = replay
        self.checker = checker
        #: () → the trainer's optimizer step now (staleness of scored student completions).
        self.current_step = current_step or (lambda: 0)
        self.stats = IntakeStats()
        self.eos_id = tokenizer.eos_token_id
        self.needs_top_k = needs_top_k(spec)
        state = state or {}
        self.seen_samples = BoundedSet(items=state.get("seen_samples"))
        self.seen_prompts = BoundedSet(items=state.get("seen_prompts"))
        self.teacher: dict[str, str] = state.get("teacher", {})
        self.pool: OrderedDict[str, PoolPrompt] = OrderedDict(
            (p["prompt_id"], PoolPrompt(**p)) for p in state.get("prompt_pool", [])
        )

    def state(self) -> dict[str, Any]:
        return {
            "seen_samples": self.seen_samples.to_list(),
            "seen_prompts": self.seen_prompts.to_list(),
            "teacher": self.teacher,
            "prompt_pool": [p.__dict__ for p in self.pool.values()],
        }

    def _remember_prompt(self, sample: pb.common.TeacherSample) -> None:
        if sample.prompt_variant != PRIMARY or sample.top_k == 0:
            return
        self.pool[sample.prompt_id] = PoolPrompt(
            sample.prompt_id, list(sample.prompt_token_ids), sample.task, int(sample.top_k)
        )
        self.pool.move_to_end(sample.prompt_id)
        if len(self.pool) > PROMPT_POOL_LIMIT:
            self.pool.popitem(last=False)

    def poll(self, timeout_s: float) -> int:
        """Reads what fits in the buffer (each record can yield two items); returns the records read."""
        room = self.buffer.room() // 2
        if room <= 0:
            return 0
        records = self.consumer.poll(timeout_s=timeout_s, max_records=room)
        for record in records:
            self._take(record)
        self.stats.read += len(records)
        return len(records)

    def _take(self, record: Received[pb.common.TeacherSample]) -> None:
        p, o = record.partition, record.offset
        replayed = self.replay is not None and self.replay.seen_before(p, o)
        if replayed and (record.error is not None or record.value is None):
            self.tracker.read(p, o, 0)  # dead-lettered before the checkpoint
            return
        if record.error is not None or record.value is None:
            self.dead_letters.send(record, record.error or "empty record", record.error_type)
            self.stats.dead_letter += 1
            metrics.SAMPLES.labels("dead_letter").inc()
            self.tracker.read(p, o, 0)
            return
        sample = record.value
        if replayed:
            assert self.replay is not None
            pending = self.replay.uses(p, o)
            items = [it for it in self._items(sample, p, o, replay=True) if it.kind in pending]
            for it in items:
                it.uses = pending[it.kind]
            self._accept(p, o, items)
            return
        if sample.sample_id in self.seen_samples:
            self.stats.duplicate += 1
            metrics.SAMPLES.labels("duplicate").inc()
            self.tracker.read(p, o, 0)
            return
        self.seen_samples.add(sample.sample_id)
        if sample.teacher_model:
            self.teacher = {"model": sample.teacher_model, "revision": sample.teacher_revision}
        if sample.split == pb.common.SPLIT_EVAL:
            self.evalset.add(sample)
            self.stats.eval += 1
            self.tracker.read(p, o, 0)
            return
        if source_of(sample) == SCORED_STUDENT and not self._on_policy_usable(sample):
            self.tracker.read(p, o, 0)
            return
        if source_of(sample) != SCORED_STUDENT:
            self._remember_prompt(sample)
        self._accept(p, o, self._items(sample, p, o, replay=False))

    def _on_policy_usable(self, sample: pb.common.TeacherSample) -> bool:
        """A scored student completion is trained on when it is this run's and (with drop_stale) fresh enough."""
        if sample.student_run_id != self.spec.run_id:
            self.stats.filtered += 1
            metrics.SAMPLES.labels("filtered").inc()
            return False
        self.stats.on_policy += 1
        metrics.ON_POLICY.labels("received").inc()
        on_policy = self.spec.on_policy
        if self.current_step() - sample.student_step > on_policy.max_staleness_steps:
            self.stats.stale += 1
            metrics.ON_POLICY.labels("stale").inc()
            if on_policy.drop_stale:
                self.stats.stale_dropped += 1
                metrics.ON_POLICY.labels("stale_dropped").inc()
                return False
        return True

    def _accept(self, p: int, o: int, items: list[Item]) -> None:
        self.tracker.read(p, o, len(items))
        for it in items:
            for evicted in self.buffer.add(it):
                self.tracker.done(evicted.partition, evicted.offset)
        self.stats.accepted += len(items)

    def _items(self, sample: pb.common.TeacherSample, p: int, o: int, replay: bool) -> list[Item]:
        """The items of a train-split sample (deterministic, so a re-read after resume gives the same ones)."""
        items: list[Item] = []
        max_len = self.spec.schedule.max_seq_len
        prompt = list(sample.prompt_token_ids)
        task = sample.task or self.spec.task
        source = source_of(sample)
        keep, weight = self._verdict(sample, task, source)
        if len(prompt) >= max_len:
            keep = False
        if keep:
            c = min(len(sample.completion_token_ids), max_len - len(prompt))
            k = sample.top_k
            top_ids = np.asarray(sample.top_ids, dtype=np.int64).reshape(-1, k)[:c] if k else None
            top_lp = np.asarray(sample.top_logprobs, dtype=np.float32).reshape(-1, k)[:c] if k else None
            ids = prompt + list(sample.completion_token_ids[:c])
            step = sample.student_step if source == SCORED_STUDENT else -1
            items.append(
                Item(p, o, SAMPLE, ids, len(prompt), top_ids, top_lp, weight, source=source, student_step=step)
            )
        elif not replay:
            self.stats.filtered += 1
            metrics.SAMPLES.labels("filtered").inc()
        if (
            self.spec.loss.reference_ce > 0
            and source == GENERATED  # a scored reference already is the reference (with the teacher's top-k)
            and sample.HasField("reference_answer")
            and (replay or sample.prompt_id not in self.seen_prompts)
            and len(prompt) < max_len - 1
        ):
            if not replay:
                self.seen_prompts.add(sample.prompt_id)
            ref = [*self.tokenizer.encode(sample.reference_answer, add_special_tokens=False), self.eos_id]
            ids = prompt + ref[: max_len - len(prompt)]
            items.append(Item(p, o, REFERENCE, ids, len(prompt), source=REFERENCE))
        return items

    def _verdict(self, sample: pb.common.TeacherSample, task: str, source: str) -> tuple[bool, float]:
        """(keep, loss weight) from the data filter and, for teacher-written completions with a reference, the
        run's checker. References are right by definition; scored student completions are trained on whatever
        they say (the teacher's distribution over them is the signal)."""
        data = self.spec.data
        if data.tasks and task not in data.tasks:
            return False, 0.0
        if data.drop_truncated and sample.finish_reason == pb.common.FINISH_REASON_LENGTH:
            return False, 0.0
        if not sample.completion_token_ids or ((self.needs_top_k or source == SCORED_STUDENT) and sample.top_k == 0):
            return False, 0.0
        if source != GENERATED or self.checker is None or not sample.HasField("reference_answer"):
            return True, 1.0  # nothing to verify against: plain distillation data
        if self.checker(sample.completion_text, sample.reference_answer):
            return True, 1.0
        if data.verify == pb.trainer.VERIFY_MODE_KEEP_CORRECT:
            return False, 0.0
        if data.verify == pb.trainer.VERIFY_MODE_WEIGHT:
            return True, data.incorrect_weight
        return True, 1.0
