"""The pipeline worker: prompts topic → teacher engine → samples topic, at least once.

Replicas share the prompt partitions through one consumer group. The worker keeps up to `batch_size` prompts
submitted to the engine and refills as they finish, so vLLM's continuous batch stays full. Each completion becomes
one `TeacherSample` (key = prompt_id, deterministic sample_id); a record with score_reference or score_completion
is scored instead, in one prefill (`scoring.py`), and gives one sample. A prompt's offset becomes committable only
after the broker acknowledged all of its samples, and a partition is committed only up to its lowest unfinished record
(`offsets.PartitionOffsets`): a crash redelivers unfinished prompts (duplicates) and never skips one (gaps).
Records that cannot be used (undecodable, invalid, refused by the engine) go to the dead-letter topic with the
reason, and the stream goes on. A dead engine or a broker that stops acknowledging stops the worker with an error.

kafka-python's consumer is not thread-safe and blocks: every consumer call runs on one dedicated thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kafka import TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from services.common import pb
from services.common.errors import InvalidArgument
from services.common.kafka import DeadLetterWriter, ProtoConsumer, ProtoProducer, Received, RecordTooLarge
from services.teacher import metrics
from services.teacher.engine import EngineDead, Logprobs, TeacherEngine
from services.teacher.inputs import record_prompt
from services.teacher.offsets import PartitionOffsets
from services.teacher.prompts import validate_prompt_record
from services.teacher.samples import Completion, build_sample, queue_seconds
from services.teacher.sampling import Limits, Sampling, sampling_from_proto
from services.teacher.scoring import ScoreTarget, score_target
from services.teacher.settings import TeacherSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

Record = Received[pb.common.PromptRecord]


class WorkerFailed(RuntimeError):
    """The worker cannot go on safely (engine dead, samples not acknowledged); the process should restart."""


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: PromptWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.worker._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.worker._on_assigned(set(assigned))
        owned = self.worker._owned()
        metrics.PROMPT_PARTITIONS.set(len(owned))
        logger.info("prompt partitions assigned",
                    extra={"partitions": sorted(tp.partition for tp in assigned), "owned": len(owned)})  # fmt: skip
        if assigned:
            self.worker._loop.call_soon_threadsafe(self.worker.assigned.set)


class PromptWorker:
    def __init__(self, engine: TeacherEngine, settings: TeacherSettings, limits: Limits) -> None:
        self.engine = engine
        self.settings = settings
        self.kafka = settings.kafka
        self.limits = limits
        self.batch_size = settings.worker.batch_size or engine.info.max_num_seqs
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="teacher-consumer")
        self._consumer: ProtoConsumer[pb.common.PromptRecord] | None = None
        self._producer: ProtoProducer | None = None
        self._dead_letters: DeadLetterWriter | None = None
        self._partitions: dict[TopicPartition, PartitionOffsets] = {}
        #: Partitions the rebalance in progress revoked, until it assigns them again (to us or not).
        self._just_revoked: dict[TopicPartition, PartitionOffsets] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self.lag: int | None = None
        #: Set once the worker is consuming; `assigned` once the group gave it partitions.
        self.started = asyncio.Event()
        self.assigned = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._last_poll = time.monotonic()

    async def _in_consumer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Consumes until `stop()`; raises `WorkerFailed` when it cannot continue safely."""
        self._producer = ProtoProducer(self.kafka, "teacher-worker")
        self._dead_letters = DeadLetterWriter(self._producer, self.kafka.topic_dead_letters, "teacher")
        self._consumer = await self._in_consumer_thread(
            lambda: ProtoConsumer(
                self.kafka,
                self.kafka.topic_prompts,
                pb.common.PromptRecord,
                group_id=self.settings.worker.group_id,
                client_name="teacher-worker",
                validate=validate_prompt_record,
                listener=_Rebalance(self),
                max_poll_records=self.batch_size,
            )
        )
        logger.info("prompt worker started", extra={"topic": self.kafka.topic_prompts, "batch_size": self.batch_size})
        self.started.set()
        last_commit = time.monotonic()
        # A member that does not poll within max_poll_interval leaves the group, even while it is busy. And a
        # rebalance (a replica joined, or died and its session expired) completes only once every member polled:
        # a busy replica that polled only every max_poll_interval / 3 held the dead one's partitions unowned for
        # that long. Its heartbeat learns of a rebalance within a heartbeat interval, so it polls that often.
        keepalive_s = min(self.kafka.max_poll_interval_ms / 3, self.kafka.heartbeat_interval_ms) / 1000
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            while not self._stopping.is_set() and self._failure is None:
                free = self.batch_size - len(self._tasks)
                if free > 0:
                    records = await self._in_consumer_thread(self._poll, free)
                elif time.monotonic() - self._last_poll > keepalive_s:
                    records = await self._in_consumer_thread(self._keepalive)
                else:
                    records = []
                    await asyncio.wait(
                        [*self._tasks, failed],
                        timeout=self.settings.worker.poll_timeout_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                for record in records:
                    self._start(record)
                if time.monotonic() - last_commit >= self.settings.worker.commit_interval_s:
                    await self._commit()
                    last_commit = time.monotonic()
        finally:
            failed.cancel()
            await self._drain()
        if self._failure is not None:
            raise WorkerFailed(str(self._failure)) from self._failure

    def _poll(self, max_records: int) -> list[Record]:
        assert self._consumer is not None
        # Returns as soon as records are there; the timeout only bounds how long an idle worker waits.
        records = self._consumer.poll(self.settings.worker.poll_timeout_s, max_records)
        self._last_poll = time.monotonic()
        # A replica left without partitions (more replicas than partitions) has nothing to read: 0, not stale.
        self.lag = self._consumer.lag() if self._consumer.assignment() else 0
        return records

    def _keepalive(self) -> list[Record]:
        """Polls with every partition paused: keeps group membership while the batch is full."""
        assert self._consumer is not None
        kafka = self._consumer.kafka
        partitions = list(kafka.assignment())
        kafka.pause(*partitions)
        try:
            # Paused partitions return nothing new; records fetched before the pause still come back and are
            # handled like any other (a few over batch_size, never dropped).
            records = self._consumer.poll(0, None)
        finally:
            # The poll may have rebalanced: resuming a partition no longer assigned raises.
            kafka.resume(*(set(partitions) & set(kafka.assignment())))
        self._last_poll = time.monotonic()
        return records

    def _owned(self) -> set[TopicPartition]:
        """The prompt partitions assigned to this worker now (any thread: kafka-python guards its assignment)."""
        return self._consumer.assignment() if self._consumer is not None else set()

    def _start(self, record: Record) -> None:
        offsets = self._partitions.get(record.tp)
        if offsets is None or offsets.revoked:
            offsets = self._partitions[record.tp] = PartitionOffsets()
        offsets.start(record.offset)
        task = asyncio.create_task(self._handle(record, offsets), name=f"prompt-{record.partition}-{record.offset}")
        self._tasks.add(task)
        metrics.PROMPTS_IN_FLIGHT.set(len(self._tasks))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        metrics.PROMPTS_IN_FLIGHT.set(len(self._tasks))
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            logger.error("prompt worker failing: %s", exc)
            self._failure = exc
            self._failed.set()

    async def _handle(self, record: Record, offsets: PartitionOffsets) -> None:
        """One prompt record, start to finish; returns normally once its offset may be committed."""
        if record.value is None:
            await self._dead_letter(record, record.error or "undecodable", record.error_type)
        else:
            try:
                await self._generate_and_publish(record, record.value)
            except InvalidArgument as exc:
                await self._dead_letter(record, str(exc), "invalid")
            except RecordTooLarge as exc:
                await self._dead_letter(record, str(exc), "too_large")
            except (EngineDead, WorkerFailed, asyncio.CancelledError):
                raise
            except Exception as exc:
                if self.engine.dead.done():
                    raise
                logger.exception("prompt failed in the engine", extra={"prompt_id": record.value.prompt_id})
                await self._dead_letter(record, f"{type(exc).__name__}: {exc}", "engine_error")
        offsets.finish(record.offset)
        metrics.PROMPTS_CONSUMED.inc()

    async def _generate_and_publish(self, record: Record, prompt_record: pb.common.PromptRecord) -> None:
        sampling = sampling_from_proto(prompt_record.sampling, self.limits)
        queue_s = queue_seconds(record.timestamp_ms)
        target = score_target(self.engine, prompt_record)
        if target is not None:
            await self._score_and_publish(prompt_record, target, sampling, queue_s)
            return
        prompt = record_prompt(self.engine, prompt_record)
        completions = {i: Completion(i, Logprobs(sampling.logprobs)) for i in range(sampling.n)}
        request_id = f"{prompt_record.prompt_id}-{uuid.uuid4().hex[:8]}"
        submitted = time.monotonic()
        async for chunk in self.engine.generate(
            prompt, sampling, request_id, stream_interval=self.settings.worker.stream_interval
        ):
            completion = completions[chunk.index]
            had_first = completion.first_token_s is not None
            completion.add(chunk, time.monotonic() - submitted)
            if not had_first and completion.first_token_s is not None:
                metrics.TIME_TO_FIRST_TOKEN.observe(completion.first_token_s)
        samples = []
        for completion in completions.values():
            if not completion.text and completion.token_ids:
                completion.text = self.engine.decode(completion.token_ids)  # the engine skipped detokenizing
            tokens = len(completion.token_ids)
            metrics.GENERATED_TOKENS.inc(tokens)
            if tokens > 1 and completion.first_token_s is not None:
                metrics.INTER_TOKEN_LATENCY.observe((completion.total_s - completion.first_token_s) / (tokens - 1))
            samples.append(build_sample(prompt_record, prompt, completion, sampling, self.engine.info, queue_s))
        await self._publish(prompt_record.prompt_id, samples)

    async def _score_and_publish(
        self, prompt_record: pb.common.PromptRecord, target: ScoreTarget, sampling: Sampling, queue_s: float
    ) -> None:
        """Teacher-forced data (a reference answer) or on-policy data (a student's completion): the teacher's top-k
        logprobs at every token of the given completion, from one prefill."""
        prompt, tokens = target.prompt, target.token_ids
        started = time.monotonic()
        logprobs = await self.engine.score([*prompt.token_ids, *tokens], len(prompt.token_ids), sampling.logprobs)
        elapsed = time.monotonic() - started
        completion = Completion(0, logprobs, token_ids=tokens, text=target.text,
                                finish_reason="stop", first_token_s=elapsed, total_s=elapsed)  # fmt: skip
        sample = build_sample(prompt_record, prompt, completion, sampling, self.engine.info, queue_s)
        student = sample.source == pb.common.SAMPLE_SOURCE_SCORED_STUDENT
        (metrics.SCORED_STUDENT_TOKENS if student else metrics.SCORED_TOKENS).inc(len(tokens))
        await self._publish(prompt_record.prompt_id, [sample])

    async def _publish(self, prompt_id: str, samples: list[pb.common.TeacherSample]) -> None:
        """Sends the samples of one prompt and waits until the broker acknowledged every one.

        A send the broker did not acknowledge (a broker restart leaves kafka-python's idempotent producer failing
        every send) rebuilds the producer and resends all the prompt's samples, for up to `publish_retry_s`;
        a resent sample the broker already had is a duplicate the trainer drops by its sample_id.
        """
        assert self._producer is not None
        producer = self._producer
        deadline = time.monotonic() + self.settings.worker.publish_retry_s
        backoff = 0.2
        while True:
            generation = producer.rebuilds
            try:
                acks = [await self._send(sample) for sample in samples]
                await asyncio.wait_for(asyncio.gather(*acks), self.settings.worker.ack_timeout_s)
                break
            except Exception as exc:
                if self._stopping.is_set() or time.monotonic() + backoff >= deadline:
                    raise WorkerFailed(f"samples of prompt {prompt_id!r} were not acknowledged: {exc!r}") from exc
                logger.warning("samples not acknowledged; resending on a rebuilt producer",
                               extra={"prompt_id": prompt_id, "error": repr(exc)})  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                await asyncio.to_thread(producer.recover, generation)
        metrics.SAMPLES_PUBLISHED.inc(len(samples))

    async def _send(self, sample: pb.common.TeacherSample) -> asyncio.Future[None]:
        """Queues a sample; the returned future completes when the broker acknowledged it."""
        assert self._producer is not None
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if acked.done():
                return
            if error is None:
                acked.set_result(None)
            else:
                acked.set_exception(error)

        # On a thread: kafka-python blocks in send while it has no metadata for the topic (a broker restart).
        kafka_future = await asyncio.to_thread(
            self._producer.send, self.kafka.topic_teacher_samples, sample.prompt_id, sample
        )
        # kafka-python calls these on its network thread.
        kafka_future.add_callback(lambda _meta: loop.call_soon_threadsafe(settle, None))
        kafka_future.add_errback(lambda exc: loop.call_soon_threadsafe(settle, exc))
        return acked

    async def _dead_letter(self, record: Record, reason: str, error_type: str) -> None:
        assert self._dead_letters is not None
        writer = self._dead_letters
        try:
            await asyncio.to_thread(writer.send, record, reason, error_type)
        except Exception as exc:
            raise WorkerFailed(f"could not dead-letter offset {record.offset}: {exc!r}") from exc

    async def _commit(self) -> None:
        """Commits every partition whose committable position moved (consumer thread)."""
        positions = {
            tp: (offsets, pos)
            for tp, offsets in list(self._partitions.items())
            if not offsets.revoked and (pos := offsets.to_commit()) is not None
        }
        if not positions or self._consumer is None:
            return
        consumer = self._consumer

        def commit() -> None:
            # Re-checked on the consumer thread: a rebalance may have revoked some partitions meanwhile.
            live = {tp: (o, pos) for tp, (o, pos) in positions.items() if not o.revoked}
            if live:
                consumer.commit({tp: pos for tp, (_, pos) in live.items()})
            for offsets, pos in live.values():
                offsets.committed = pos

        try:
            await self._in_consumer_thread(commit)
        except Exception as exc:  # a rebalance in progress: the next commit (or the new owner) catches up
            logger.warning("offset commit failed: %r", exc)

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """kafka-python's IO thread, during a poll: commit what is finished on the partitions we lose (without
        blocking: a blocking commit raises there), then forget them. The commit goes out before the worker rejoins;
        should it still fail, the new owner redoes a little more (duplicates, never gaps)."""
        positions = {}
        for tp in revoked:
            offsets = self._partitions.get(tp)
            if offsets is None:
                continue
            offsets.revoked = True  # results still in flight get published but never committed by us
            self._just_revoked[tp] = offsets
            pos = offsets.to_commit()
            if pos is not None:
                positions[tp] = pos
        if positions and self._consumer is not None:
            try:
                self._consumer.commit_async(positions)
            except Exception as exc:
                logger.warning("commit on revoke failed: %r", exc)
        metrics.PROMPT_PARTITIONS.set(len(self._owned() - revoked))
        logger.info("prompt partitions revoked", extra={"partitions": sorted(tp.partition for tp in revoked)})

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        """kafka-python's IO thread, at the end of a rebalance. Every rebalance revokes every partition first (the
        eager protocol); a partition given back to this worker goes on where it was, its prompts in flight still
        tracked and committed by it. kafka-python keeps such a partition's position: without this, those prompts
        sat in a revoked, never committed record while later ones were committed past them (a crash then lost
        them); a client that reset to the committed offset would redo them on every replica each time one joins or
        leaves. Safe either way: every offset below `next_offset` was started by this worker and is committed only
        once finished; reading resumes at `next_offset`."""
        kept, self._just_revoked = self._just_revoked, {}
        assert self._consumer is not None
        for tp in assigned & kept.keys():
            offsets = kept[tp]
            position = offsets.next_offset
            if position is not None:
                offsets.revoked = False
                self._consumer.seek(tp, position)

    async def _drain(self) -> None:
        """Stops cleanly: lets in-flight prompts finish within the grace period, commits, closes clients."""
        if self._tasks and self._failure is None:
            await asyncio.wait(list(self._tasks), timeout=self.settings.grace_period_s)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._failure is None:
            await self._commit()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._in_consumer_thread(self._consumer.close)
        if self._producer is not None:
            producer = self._producer
            with contextlib.suppress(Exception):
                await asyncio.to_thread(producer.close, 5.0)
        self._thread.shutdown(wait=False)
        logger.info("prompt worker stopped")
