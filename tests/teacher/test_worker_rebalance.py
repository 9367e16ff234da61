"""The pipeline worker (fake engine, real broker) in a group that rebalances: a replica that joins while the worker's
batch is full gets its partitions within seconds, the busy worker keeps running, and once the joiner leaves every
prompt is answered and committed; finished work on partitions the worker loses is committed as it loses them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

from services.common import pb
from services.common.kafka import ProtoConsumer
from services.common.settings import KafkaSettings
from services.teacher.prompts import publish
from tests.teacher.conftest import _committed, chat_record, end_offsets, read_topic, running_worker, wait_committed
from tests.teacher.fakes import FakeEngine

PROMPTS = 16


async def test_a_replica_joining_while_the_batch_is_full_gets_partitions_and_nothing_is_lost(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    engine = FakeEngine()
    engine.block = True  # every generation waits for `release`: the worker's batch stays full
    kafka = kafka_settings
    # Every prompt in flight at once, on both partitions.
    async with running_worker(engine, tmp_path, tmp_path, kafka, batch_size=PROMPTS) as app:
        assert app.worker is not None
        await asyncio.wait_for(app.worker.assigned.wait(), 60)
        records = [chat_record(f"r{i:02d}", f"Question {i}") for i in range(PROMPTS)]
        await asyncio.to_thread(publish, kafka, records)
        for _ in range(300):
            if len(engine.requests) >= PROMPTS:
                break
            await asyncio.sleep(0.1)
        assert len(engine.requests) == PROMPTS  # the batch is full: the worker polls only to keep its membership

        group = app.settings.worker.group_id
        joiner = ProtoConsumer(kafka, kafka.topic_prompts, pb.common.PromptRecord, group, f"joiner-{uuid.uuid4()}")
        try:
            started = time.monotonic()
            # A rebalance completes only once every member polled: the busy worker must not hold it up for
            # max_poll_interval / 3 (100 s by default). Session timeout + a margin is generous.
            got = await asyncio.to_thread(joiner.wait_for_assignment, kafka.session_timeout_ms / 1000 + 10)
            joined_s = time.monotonic() - started
            assert len(got) == 1, got
            assert not app.fatal.done(), app.fatal  # the rebalance inside the paused poll did not break the worker
            print(f"a joiner got {sorted(tp.partition for tp in got)} after {joined_s:.1f}s")
        finally:
            await asyncio.to_thread(joiner.close)  # leaves the group: the worker takes every partition back
        engine.release.set()
        more = [chat_record(f"s{i:02d}", f"Question {i}") for i in range(4)]
        await asyncio.to_thread(publish, kafka, more)  # read after the rebalances: no partition stays paused
        records += more
        await wait_committed(app.settings)  # every prompt finished
        assert not app.fatal.done()
        total = sum((await asyncio.to_thread(end_offsets, kafka, kafka.topic_teacher_samples)).values())
        samples = await asyncio.to_thread(
            read_topic, kafka, kafka.topic_teacher_samples, pb.common.TeacherSample, total
        )
        per_prompt = Counter(r.value.prompt_id for r in samples)
        assert set(per_prompt) == {r.prompt_id for r in records}
        # The partition the worker kept through the rebalance went on where it was (kafka-python keeps its position)
        # with the prompts in flight still tracked: each answered once, and committed. Those of the partition the
        # joiner held may have been redone (duplicates, which the trainer drops).
        prompts = await asyncio.to_thread(read_topic, kafka, kafka.topic_prompts, pb.common.PromptRecord, len(records))
        kept = {r.value.prompt_id for r in prompts if r.partition not in {tp.partition for tp in got}}
        assert kept and all(per_prompt[p] == 1 for p in kept), {p: per_prompt[p] for p in kept}
        print(
            f"{total} samples for {len(records)} prompts; {sum(per_prompt[p] for p in kept)} for the {len(kept)} kept"
        )


async def test_finished_work_on_revoked_partitions_is_committed_as_they_go(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    kafka = kafka_settings
    # No periodic commit: only the commit on revocation can move the group's offsets.
    async with running_worker(FakeEngine(), tmp_path, tmp_path, kafka, commit_interval_s=600) as app:
        assert app.worker is not None
        await asyncio.wait_for(app.worker.assigned.wait(), 60)
        records = [chat_record(f"r{i:02d}", f"Question {i}") for i in range(PROMPTS)]
        await asyncio.to_thread(publish, kafka, records)
        await asyncio.to_thread(read_topic, kafka, kafka.topic_teacher_samples, pb.common.TeacherSample, PROMPTS, 60)
        group = app.settings.worker.group_id
        want = await asyncio.to_thread(end_offsets, kafka, kafka.topic_prompts)
        assert await asyncio.to_thread(_committed, kafka, group, kafka.topic_prompts) == dict.fromkeys(want)

        joiner = ProtoConsumer(kafka, kafka.topic_prompts, pb.common.PromptRecord, group, f"joiner-{uuid.uuid4()}")
        try:
            await asyncio.to_thread(joiner.wait_for_assignment, kafka.session_timeout_ms / 1000 + 10)
            # The joiner starts where the worker stopped: nothing of what it finished is redone.
            assert await asyncio.to_thread(_committed, kafka, group, kafka.topic_prompts) == want
            assert await asyncio.to_thread(joiner.poll, 1.0) == []
        finally:
            await asyncio.to_thread(joiner.close)
