"""The pipeline worker (fake engine, real broker) in a group that rebalances: a replica that joins while the worker's
batch is full gets its partitions within seconds, the busy worker keeps running, and once the joiner leaves every
prompt is answered and committed; finished work on partitions the worker loses is committed as it loses them."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from services.common import pb
from services.common.kafka import ProtoConsumer
from services.common.settings import KafkaSettings
from services.teacher.prompts import publish
from tests.teacher.conftest import _committed, chat_record, end_offsets, read_topic, running_worker, wait_committed
from tests.teacher.fakes import FakeEngine

PROMPTS = 16  # two full batches of 8 over 2 partitions


async def test_a_replica_joining_while_the_batch_is_full_gets_partitions_and_nothing_is_lost(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    engine = FakeEngine()
    engine.block = True  # every generation waits for `release`: the worker's batch stays full
    kafka = kafka_settings
    async with running_worker(engine, tmp_path, tmp_path, kafka) as app:
        assert app.worker is not None
        await asyncio.wait_for(app.worker.assigned.wait(), 60)
        records = [chat_record(f"r{i:02d}", f"Question {i}") for i in range(PROMPTS)]
        await asyncio.to_thread(publish, kafka, records)
        for _ in range(300):
            if len(engine.requests) >= app.worker.batch_size:
                break
            await asyncio.sleep(0.1)
        assert len(engine.requests) == app.worker.batch_size  # full: the worker polls only to keep its membership

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
        received = await asyncio.to_thread(
            read_topic, kafka, kafka.topic_teacher_samples, pb.common.TeacherSample, PROMPTS, 60
        )
        assert {r.value.prompt_id for r in received} == {r.prompt_id for r in records}
        await wait_committed(app.settings)
        assert not app.fatal.done()


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
