"""One distillation run: intake → batches → AdamW steps → periodic evaluation, checkpoint, gate, announcement.

`TrainingRun.run()` blocks (the run manager calls it on a worker thread; torch releases the GIL, so gRPC stays
responsive). It starts from the newest verified checkpoint of the run when there is one — weights, optimizer
moments, step, RNG, intake and eval state, and the Kafka offsets in its manifest — and otherwise reads the samples
topic from the beginning and makes the student from the spec's recipe (a pruned student is calibrated on the first
training samples of the user's own prompts). It trains on the device the settings name (CUDA when there is one,
with `device: auto`); with on-policy distillation on, it also samples from its student every few steps and sends
the completions to be scored (`onpolicy.py`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from google.protobuf.timestamp_pb2 import Timestamp
from kafka import TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from services.common import pb
from services.common.kafka import DeadLetterWriter, ProtoConsumer, ProtoProducer, Received
from services.common.models import load_causal_lm, load_tokenizer
from services.common.outvocab import coverage_of
from services.common.registry import Checkpoint, Registry
from services.tasks import parse_checker
from services.trainer import metrics, vocab
from services.trainer.batching import batch_loss, collate, lr_at, restricted_head
from services.trainer.buffer import SAMPLE, SOURCES, Item, OffsetTracker, Replay, ReplayBuffer, resume_state
from services.trainer.calibration import collect_calibration, needs_calibration, sequences
from services.trainer.checkpoint import (
    ResumePoint,
    checkpoint_event,
    gate_metric,
    last_promoted_of_task,
    newest_resume_point,
    optimizer_from_tensors,
    passes_gate,
    write_checkpoint,
)
from services.trainer.device import bf16_is_fast, resolve_device
from services.trainer.evalset import EvalSet
from services.trainer.evaluate import EvalResult, evaluate
from services.trainer.intake import Intake, needs_top_k, sample_validator
from services.trainer.onpolicy import OnPolicySampler
from services.trainer.parallel import DataParallel, Micro, RankLost, share_start
from services.trainer.settings import TrainerSettings
from services.trainer.spec import loss_weights, to_json
from services.trainer.student import make_student

logger = logging.getLogger(__name__)

Progress = Callable[[pb.trainer.RunProgress], None]


class SeekOnAssign(ConsumerRebalanceListener):  # type: ignore[misc]
    """Positions each assigned partition at the checkpoint's offset, or the beginning when it has none."""

    def __init__(self, offsets: dict[int, int]) -> None:
        self.offsets = offsets
        self.consumer: Any = None

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        for tp in assigned:
            if tp.partition in self.offsets:
                self.consumer.seek(tp, self.offsets[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)


def torch_threads(wanted: int) -> int:
    return wanted or len(os.sched_getaffinity(0))


def make_optimizer(model: Any, s: pb.trainer.Schedule) -> torch.optim.AdamW:
    """The run's AdamW (every data-parallel rank builds the same one): no weight decay on norms and biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.learning_rate,
        betas=(0.9, 0.95),
        fused=True,  # one kernel over all parameters: ≈3× faster optimizer step on CPU than the for-each loop
    )


class TooManyQuarantined(RuntimeError):
    """More training micro-batches raised than `max_quarantined_batches` allows: the run fails."""


class TrainingRun:
    def __init__(
        self,
        settings: TrainerSettings,
        spec: pb.trainer.RunSpec,
        teacher_dir: Path,
        registry: Registry,
        producer: ProtoProducer,
        on_progress: Progress,
        stop: threading.Event,
        evaluate_on_stop: threading.Event | None = None,
        data_parallel: bool = False,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.teacher_dir = teacher_dir
        self.registry = registry
        self.producer = producer
        self.on_progress = on_progress
        self.stop = stop
        self.evaluate_on_stop = evaluate_on_stop or threading.Event()
        #: Rank 0 of a torch.distributed group (`ranks.py`): micro-batches are sliced over the ranks (`parallel.py`).
        self.data_parallel = data_parallel
        self.dp: DataParallel | None = None
        self.topic = settings.kafka.topic_teacher_samples
        self.progress = pb.trainer.RunProgress(
            run_id=spec.run_id, state=pb.trainer.RUN_STATE_RUNNING, max_steps=spec.schedule.max_steps
        )
        self.student_parameters = 0
        self.step = 0
        self._last_ckpt_step = 0  # nothing trained yet: a stop before the first step writes no checkpoint
        self.quarantined_batches = 0
        self._eval_pending = False
        self._window: deque[tuple[float, int]] = deque(maxlen=20)
        self._source_window: deque[tuple[dict[str, float], dict[str, int]]] = deque(maxlen=20)

    # --- set-up -------------------------------------------------------------------------------------------------

    def _load(self) -> tuple[ResumePoint | None, bool]:
        """Model, optimizer and intake, resumed or new; (resume point, ready) — not ready when stopped while
        waiting for calibration samples."""
        self.device = resolve_device(self.settings.device)
        # bf16 autocast only where bf16 is native: an AVX2 CPU emulates it, 50× slower than float32 on a matmul.
        self.autocast = self.spec.schedule.bf16_autocast and bf16_is_fast(self.device)
        if self.device.type == "cpu":  # thread counts are a CPU matter; a CUDA trainer leaves them alone
            torch.set_num_threads(torch_threads(self.settings.torch_threads))
        torch.manual_seed(self.spec.seed)
        resume = newest_resume_point(self.registry, self.spec.run_id)
        if resume is not None:
            folder = resume.checkpoint.path
            logger.info("resuming run", extra={"run_id": self.spec.run_id, "checkpoint": str(folder)})
        else:
            folder = self.settings.work_dir / self.spec.run_id / "student-init"
            shutil.rmtree(folder, ignore_errors=True)
            folder.parent.mkdir(parents=True, exist_ok=True)
        # The student keeps the teacher's tokenizer: the intake can read samples before the student exists.
        self.tokenizer = load_tokenizer(folder if resume is not None else self.teacher_dir)
        self._open_intake(resume)
        coverage = self.spec.student.output_vocab_coverage
        first: list[Item] = []
        if resume is None:
            calibration = output_vocab = None
            if needs_calibration(self.spec.student, self.teacher_config) or coverage > 0:
                found = collect_calibration(self.intake, self.buffer, self._calibration_count(), self.stop,
                                            self._publish_idle, idle_s=self.settings.batch_wait_s)  # fmt: skip
                if found is None:
                    return None, False
                first = found
                if needs_calibration(self.spec.student, self.teacher_config):
                    calibration = sequences(first)
            if coverage > 0:
                output_vocab = vocab.choose(first, self.tokenizer, coverage, self._vocab_size()).token_ids
            make_student(self.teacher_dir, self.spec.student, folder, calibration, seed=self.spec.seed,
                         output_vocab=output_vocab)  # fmt: skip
        self.tokenizer_dir = folder
        self.model = load_causal_lm(folder, dtype=torch.float32).to(self.device)
        self.model.train()
        self._record_output_vocab(resume, first)
        # A compiled view of the decoder for training steps; it shares the parameters, so checkpoints and the
        # (eager) evaluation see the same weights.
        self.body = torch.compile(self.model.model, dynamic=True) if self.settings.compile else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.student_parameters = sum(p.numel() for p in self.model.parameters())
        self.optimizer = make_optimizer(self.model, self.spec.schedule)
        if resume is not None:
            optimizer_from_tensors(self.optimizer, resume.optimizer_tensors, resume.state["param_groups"])
            if "rng.torch" in resume.optimizer_tensors:
                torch.set_rng_state(resume.optimizer_tensors["rng.torch"])
            self.step = int(resume.state["step"])
            self._last_ckpt_step = self.step
            self.progress.tokens_trained = int(resume.checkpoint.manifest.metrics.get("tokens_trained", 0))
            self.progress.tokens_by_source.update(resume.state.get("tokens_by_source", {}))
            self.progress.last_checkpoint_version = resume.checkpoint.version
        if self.data_parallel:
            # The other ranks load the same folder (and optimizer state), then take rank 0's weights.
            share_start(self.device, str(folder), resume is not None)
            self.dp = DataParallel(self.model, self.optimizer, self.weights, self.on_policy_weights, self.autocast,
                                   self.device, self.pad_id, self.body)  # fmt: skip
            self.dp.sync_weights()
        return resume, True

    def _calibration_count(self) -> int:
        return self.spec.student.pruned.calibration_samples or self.settings.calibration_samples

    def _vocab_size(self) -> int:
        return int(self.teacher_config.get("vocab_size") or len(self.tokenizer))

    def _record_output_vocab(self, resume: ResumePoint | None, first: list[Item]) -> None:
        """A restricted head's size and its coverage of the selection samples' answer tokens (kept in every
        checkpoint's metrics, so a resumed run reports the figures of the run start that chose the head)."""
        self.output_vocab: dict[str, float] = {}
        head = restricted_head(self.model)
        if head is None:
            return
        self.output_vocab["output_vocab_size"] = float(head.token_ids.numel())
        if resume is not None:
            stored = resume.checkpoint.manifest.metrics.get("output_vocab_coverage")
            if stored is not None:
                self.output_vocab["output_vocab_coverage"] = float(stored)
            self.progress.tokens_outside_head = int(resume.checkpoint.manifest.metrics.get("tokens_outside_head", 0))
        elif first:
            answers = vocab.answer_counts(first)
            self.output_vocab["output_vocab_coverage"] = coverage_of(head.token_ids.tolist(), answers)
        logger.info("restricted output vocabulary", extra={"run_id": self.spec.run_id, **self.output_vocab})

    @property
    def teacher_config(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.teacher_dir / "config.json").read_text())
        return data

    def _open_intake(self, resume: ResumePoint | None) -> None:
        s = self.spec
        offsets: dict[int, int] = {}
        state: dict[str, Any] = {}
        if resume is not None:
            offsets = {int(p): int(o) for p, o in resume.checkpoint.manifest.kafka_offsets.get(self.topic, {}).items()}
            state = resume.state
        listener = SeekOnAssign(offsets)
        # Token ids are checked against the embedding they will index (the vocabulary is never pruned): an id past
        # it is a dead letter, not an IndexError that fails every run re-reading the topic.
        vocab_size = self._vocab_size()
        self.consumer: ProtoConsumer[pb.common.TeacherSample] = ProtoConsumer(
            self.settings.kafka,
            self.topic,
            pb.common.TeacherSample,
            group_id=f"{self.settings.group_prefix}.{s.run_id}",
            client_name=f"trainer-{s.run_id}",
            validate=sample_validator(vocab_size, needs_top_k(s)),
            listener=listener,
        )
        listener.consumer = self.consumer.kafka
        self.checker = parse_checker(s.checker, self.settings.checker_modules) if s.checker else None
        self.buffer = ReplayBuffer(s.schedule.replay_buffer_size, s.schedule.sample_reuse)
        self.tracker = OffsetTracker(start=offsets)
        self.evalset = EvalSet(s.eval.max_prompts, s.eval.max_agreement_samples, self.checker)
        if "eval" in state:
            self.evalset.load_state(state["eval"])
        dead = self.dead_letters = DeadLetterWriter(self.producer, self.settings.kafka.topic_dead_letters, "trainer")
        replay = Replay.from_state(state["buffer"]) if "buffer" in state else None
        self.intake = Intake(
            s, self.consumer, dead, self.tokenizer, self.buffer, self.tracker, self.evalset, replay,
            state.get("intake"), checker=self.checker, current_step=lambda: self.step,
        )  # fmt: skip
        self.weights = loss_weights(s)
        self.on_policy_weights = loss_weights(s, on_policy=True)
        self.sampler = OnPolicySampler(
            s, self.producer, self.settings.kafka.topic_prompts, self.settings.announce_timeout_s, seed=s.seed
        )

    # --- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Trains until max_steps or `stop`; returns the final RunState (SUCCEEDED or STOPPED)."""
        lost = False
        try:
            _, ready = self._load()
            if not ready:
                if self.data_parallel:
                    share_start(self.device, "", False)  # no run: the other ranks leave
                return pb.trainer.RUN_STATE_STOPPED
            s = self.spec.schedule
            while not self.stop.is_set() and not (s.max_steps and self.step >= s.max_steps):
                if self.sampler.due(self.step):
                    self.sampler.round(self.model, self.tokenizer, list(self.intake.pool.values()), self.step,
                                       self.device, self.autocast)  # fmt: skip
                if not self._train_step():
                    break
                if self.step % s.eval_every_steps == 0:
                    self._checkpoint(evaluate_first=True)
                    # Held-out answers still coming in: this checkpoint is kept for resume, the evaluation (and so
                    # the gate) happens as soon as they are all in, not an eval_every_steps later.
                    self._eval_pending = not self._held_out_ready()
                elif self._eval_pending and self._held_out_ready():
                    self._checkpoint(evaluate_first=True)
                    self._eval_pending = False
            finished = bool(s.max_steps and self.step >= s.max_steps)
            evaluate = finished or self.evaluate_on_stop.is_set()
            if self.step != self._last_ckpt_step and (evaluate or self.settings.checkpoint_on_stop):
                self._checkpoint(evaluate_first=evaluate)
            return pb.trainer.RUN_STATE_SUCCEEDED if finished else pb.trainer.RUN_STATE_STOPPED
        except RankLost:
            lost = True
            raise
        finally:
            if self.dp is not None and not lost:
                self.dp.close()  # the other ranks leave too (also when this run failed)
            consumer = getattr(self, "consumer", None)
            if consumer is not None:
                consumer.close()

    def _next_items(self, n: int) -> list[Item] | None:
        """The next micro-batch's items (blocking on the stream), or None when asked to stop."""
        waited_since: float | None = None
        replay_ok = self.spec.schedule.sample_reuse > 1
        while not self.stop.is_set():
            enough = self.buffer.fresh >= n
            read = self.intake.poll(0.0 if enough else self.settings.poll_timeout_s)
            on_policy = round(self.spec.on_policy.fraction * n)
            if self.buffer.fresh >= n:
                items, done = self.buffer.take(n, replay=replay_ok and on_policy > 0, on_policy=on_policy)
            elif read == 0 and replay_ok and len(self.buffer) >= n:
                # A full batch of fresh and replayed items. Partial batches would spend optimizer steps (and the
                # schedule) on a handful of samples while the teacher is still producing them.
                items, done = self.buffer.take(n, replay=True, on_policy=on_policy)
            elif read == 0 and self.buffer.fresh > 0:
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since < self.settings.batch_wait_s:
                    continue
                items, done = self.buffer.take(n, replay=replay_ok, on_policy=on_policy)
            else:
                self._publish_idle()
                continue
            self._pending_done.extend(done)
            return items
        return None

    def _train_step(self) -> bool:
        """One optimizer step over grad_accum_steps micro-batches; False when stopped before any data came."""
        s = self.spec.schedule
        started = time.monotonic()
        self._pending_done: list[Item] = []
        lr = lr_at(self.step, s.learning_rate, s.warmup_steps, s.max_steps, s.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals: dict[str, float] = {}
        source_loss: dict[str, float] = {}
        source_tokens: dict[str, int] = {}
        loss_sum, targets, tokens, micro, outside = 0.0, 0, 0, 0, 0
        trained: list[Item] = []
        while micro < s.grad_accum_steps:
            items = self._next_items(s.batch_size)
            if items is None:
                break  # stopping: apply what was accumulated, so every taken item is really trained
            out = self._micro(items) if self.dp is None else self.dp.micro(items, s.grad_accum_steps)
            if out.failure is not None:  # a batch that still raises is quarantined, not the run's end
                self._quarantine(items, out.failure)
                if out.backward:
                    # A backward that failed part-way left partial gradients: drop this step's accumulation. The
                    # micro-batches already in it count as used (their records are not re-read).
                    self.optimizer.zero_grad(set_to_none=True)
                    for acc in (totals, source_loss, source_tokens):
                        acc.clear()
                    loss_sum, targets, tokens, micro, outside = 0.0, 0, 0, 0, 0
                continue
            trained += items
            micro += 1
            loss_sum += out.loss
            for name, value in out.parts.items():
                totals[name] = totals.get(name, 0.0) + value
            for name, value in out.source_loss.items():
                source_loss[name] = source_loss.get(name, 0.0) + value
                source_tokens[name] = source_tokens.get(name, 0) + out.source_tokens[name]
            targets += out.targets
            tokens += out.tokens
            outside += out.outside_head
            first_use = sum(1 for it in items if it.kind == SAMPLE and it.uses == 1)
            metrics.SAMPLES.labels("trained").inc(first_use)
        if micro == 0:
            return False
        if self.dp is not None:
            self.dp.step(lr, s.max_grad_norm)  # gradients summed over the ranks, then the same clip and step
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for it in self._pending_done:
            self.tracker.done(it.partition, it.offset)
        self.step += 1
        if self.settings.lineage_log is not None:
            self._lineage(trained)
        elapsed = time.monotonic() - started
        self._window.append((elapsed, targets))
        rate = sum(t for _, t in self._window) / max(1e-9, sum(e for e, _ in self._window))
        components = {k: v / micro for k, v in totals.items()}
        self._record_sources(source_loss, source_tokens)
        self.progress.tokens_outside_head += outside
        self._record_step(loss_sum / micro, components, targets, rate, lr)
        return micro == s.grad_accum_steps or not self.stop.is_set()

    def _micro(self, items: list[Item]) -> Micro:
        """Forward and backward of one micro-batch on this process (one rank); a failure is returned, not raised."""
        accum = self.spec.schedule.grad_accum_steps
        backward = False
        try:
            batch = collate(items, self.pad_id).to(self.device)
            out = batch_loss(self.model, batch, self.weights, self.autocast, self.body, self.on_policy_weights)
            if not torch.isfinite(out.loss.detach()):
                raise FloatingPointError(f"non-finite loss {float(out.loss.detach())}")
            backward = True
            (out.loss / accum).backward()
        except Exception as exc:
            return Micro(failure=exc, backward=backward)
        return Micro(float(out.loss.detach()), out.parts, out.source_loss, out.source_tokens, batch.targets_count,
                     batch.tokens, outside_head=out.outside_head)  # fmt: skip

    def _quarantine(self, items: list[Item], exc: Exception) -> None:
        """Dead-letters the records of a micro-batch whose step raised and drops its items (their records are done,
        so a resume does not re-read them); past `max_quarantined_batches` the run fails."""
        self.quarantined_batches += 1
        reason = f"training step raised {type(exc).__name__}: {str(exc)[:300]}"
        logger.error(
            "quarantined a training batch",
            exc_info=exc,
            extra={"run_id": self.spec.run_id, "step": self.step, "items": len(items),
                   "quarantined": self.quarantined_batches},
        )  # fmt: skip
        if self.quarantined_batches > self.settings.max_quarantined_batches:
            raise TooManyQuarantined(
                f"{self.quarantined_batches} training batches raised, more than max_quarantined_batches="
                f"{self.settings.max_quarantined_batches}; the last: {reason}"
            ) from exc
        in_batch = {id(it) for it in items}
        # Items this batch used up are already out of the buffer and would be marked done after the step: do it now.
        self._pending_done = [it for it in self._pending_done if id(it) not in in_batch]
        records: set[tuple[int, int]] = set()
        for it in items:
            self.buffer.discard(it)
            self.tracker.done(it.partition, it.offset)
            records.add((it.partition, it.offset))
        for p, o in sorted(records):
            # The value stays in the samples topic at these coordinates; the buffer does not keep raw records.
            record: Received[Any] = Received(self.topic, p, o, None, b"", {})
            self.dead_letters.send(record, f"{reason} (the record is at {self.topic}/{p}/{o})", "train_error")
        self.intake.stats.dead_letter += len(records)
        metrics.SAMPLES.labels("dead_letter").inc(len(records))

    def _record_sources(self, source_loss: dict[str, float], source_tokens: dict[str, int]) -> None:
        """Tokens per signal source (whole run) and their mean loss over the last steps."""
        self._source_window.append((source_loss, source_tokens))
        for name, count in source_tokens.items():
            self.progress.tokens_by_source[name] = self.progress.tokens_by_source[name] + count
            metrics.TOKENS_TRAINED.labels(name).inc(count)
        for name in SOURCES:
            n = sum(t.get(name, 0) for _, t in self._source_window)
            if n:
                self.progress.loss_by_source[name] = sum(v.get(name, 0.0) for v, _ in self._source_window) / n

    def _lineage(self, items: list[Item]) -> None:
        line = {
            "pid": os.getpid(),
            "run_id": self.spec.run_id,
            "step": self.step,
            "items": [[it.partition, it.offset, it.kind, it.uses] for it in items],
        }
        assert self.settings.lineage_log is not None
        with open(self.settings.lineage_log, "a") as f:
            f.write(json.dumps(line) + "\n")

    # --- progress, evaluation, checkpoints ----------------------------------------------------------------------

    def _record_step(self, loss: float, components: dict[str, float], targets: int, rate: float, lr: float) -> None:
        p = self.progress
        p.step = self.step
        p.loss = loss
        p.loss_components.clear()
        p.loss_components.update(components)
        p.tokens_trained += targets
        p.tokens_per_s = rate
        p.learning_rate = lr
        metrics.STEP.set(self.step)
        metrics.TOKENS_PER_SECOND.set(rate)
        metrics.LOSS.labels("total").set(loss)
        for name, value in components.items():
            metrics.LOSS.labels(name).set(value)
        self._publish()

    def _held_out_ready(self) -> bool:
        return self.evalset.ready(self.spec.eval.min_eval_samples)

    def _publish_idle(self) -> None:
        now = time.monotonic()
        if now - getattr(self, "_idle_published", 0.0) >= 1.0:
            self._idle_published = now
            self._publish()

    def _publish(self) -> None:
        p = self.progress
        st = self.intake.stats
        p.samples_seen = st.read
        p.samples_dropped = st.duplicate + st.filtered + st.dead_letter + st.stale_dropped
        p.on_policy_requested = self.sampler.requested
        p.on_policy_received = st.on_policy
        p.stale_samples = st.stale
        p.stale_dropped = st.stale_dropped
        lag = self.consumer.lag()
        if lag is not None:
            p.lag = lag
            metrics.CONSUMER_LAG.set(lag)
        now = Timestamp()
        now.GetCurrentTime()
        p.updated_at.CopyFrom(now)
        self.on_progress(p)

    def _checkpoint(self, evaluate_first: bool) -> Checkpoint:
        result = EvalResult()
        metric = gate_metric(self.spec)
        evaluated = evaluate_first and self._held_out_ready()
        if evaluated:
            started = time.monotonic()
            result = evaluate(self.model, self.tokenizer, self.evalset, self.spec, self.device, self.autocast)
            logger.info(
                "evaluated",
                extra={"run_id": self.spec.run_id, "step": self.step, "metrics": result.metrics(),
                       "seconds": round(time.monotonic() - started, 1), "examples": result.samples},
            )  # fmt: skip
            for name, value in result.metrics().items():
                if name in metrics.EVAL_GAUGES:
                    metrics.EVAL_GAUGES[name].set(value)
            if metric in result.metrics():
                metrics.GATE_SCORE.labels(metric).set(result.metrics()[metric])
            self.progress.last_eval.CopyFrom(result.to_proto(self.step, metric))
        scores = {**result.metrics(), "loss": self.progress.loss, "tokens_trained": float(self.progress.tokens_trained)}
        head = restricted_head(self.model)
        if head is not None:
            scores.update(self.output_vocab)
            scores["tokens_outside_head"] = float(self.progress.tokens_outside_head)
            held = vocab.heldout_coverage(head.token_ids.tolist(), self.evalset.samples) if evaluated else None
            if held is not None:  # the held-out teacher answers are in
                scores["output_vocab_heldout_coverage"] = held
        offsets = {str(p): o for p, o in self.tracker.safe_offsets().items()}
        teacher = self.intake.teacher or {"model": self.teacher_dir.name}
        ckpt = write_checkpoint(
            self.registry,
            self.model,
            self.optimizer,
            self.tokenizer_dir,
            run_id=self.spec.run_id,
            step=self.step,
            parameter_count=self.student_parameters,
            metrics=scores,
            teacher=teacher,
            run_spec=to_json(self.spec),
            kafka_offsets={self.topic: offsets},
            trainer_state={
                "buffer": resume_state(self.tracker, self.buffer),
                "intake": self.intake.state(),
                "eval": self.evalset.to_state(),
                "tokens_by_source": dict(self.progress.tokens_by_source),
            },
        )
        self._last_ckpt_step = self.step
        metrics.CHECKPOINTS_WRITTEN.inc()
        promote, why = passes_gate(scores, self.spec.gate, metric, last_promoted_of_task(self.registry, self.spec.task))
        # Announce, then mark promoted: the registry lists a promotion only once the broker acknowledged its event,
        # so serving (which follows the events) and the registry cannot disagree. The producer is rebuilt and the
        # event resent across a broker restart; an announcement still failing after announce_timeout_s fails the run
        # (it resumes from this checkpoint, unpromoted).
        self.producer.send_and_wait(
            self.settings.kafka.topic_checkpoints, self.spec.run_id, checkpoint_event(ckpt, promote),
            timeout_s=self.settings.announce_timeout_s,
        )  # fmt: skip
        if promote:
            self.registry.promote(ckpt)
            metrics.CHECKPOINTS_PROMOTED.inc()
            self.progress.promoted_version = ckpt.version
        try:
            # Informational for lag tools: resume always seeks to the manifest's offsets, not to these.
            self.consumer.commit({TopicPartition(self.topic, int(p)): o for p, o in offsets.items()})
        except KafkaError as exc:  # a broker restart or a rebalance: the next checkpoint commits again
            logger.warning("offset commit failed", extra={"run_id": self.spec.run_id, "error": repr(exc)})
        self.progress.last_checkpoint_version = ckpt.version
        logger.info(
            "checkpoint written",
            extra={"run_id": self.spec.run_id, "version": ckpt.version, "step": self.step, "promoted": promote,
                   "gate": f"{metric}: {why}", "offsets": offsets},
        )  # fmt: skip
        self._publish()
        return ckpt
