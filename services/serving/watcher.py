"""Checkpoint watcher: follows the checkpoints topic and swaps to every promoted checkpoint.

Each replica reads in its own consumer group (every replica must see every promotion), from the earliest offset:
events not newer than the served version are ignored cheaply, so replaying the topic at start-up costs little.
kafka-python is blocking, so the consumer runs on a thread and hands each event to the event loop, waits for the
swap to finish (or fail), and only then commits the offset.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from services.common import pb
from services.common.kafka import ProtoConsumer
from services.common.settings import KafkaSettings

logger = logging.getLogger(__name__)

Handler = Callable[["pb.common.CheckpointEvent"], Coroutine[Any, Any, None]]


def default_group() -> str:
    return f"distillery-serving-{socket.gethostname()}-{os.getpid()}"


class CheckpointWatcher:
    """Consumes CheckpointEvents on a thread; `handle` runs on the event loop for each promoted one."""

    def __init__(
        self,
        kafka: KafkaSettings,
        handle: Handler,
        loop: asyncio.AbstractEventLoop,
        group_id: str | None = None,
        handle_timeout_s: float = 900.0,
    ) -> None:
        self.kafka = kafka
        self.handle = handle
        self.loop = loop
        self.group_id = group_id or default_group()
        self.handle_timeout_s = handle_timeout_s
        self.assigned = threading.Event()
        self.handled = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        consumer: ProtoConsumer[pb.common.CheckpointEvent] | None = None
        while not self._stop.is_set():
            try:
                consumer = ProtoConsumer(
                    self.kafka,
                    self.kafka.topic_checkpoints,
                    pb.common.CheckpointEvent,
                    group_id=self.group_id,
                    client_name="serving-watcher",
                    max_poll_records=16,
                )
                self._consume(consumer)
            except Exception as exc:  # broker gone, group trouble: keep serving, retry
                self.error = exc
                logger.exception("checkpoint watcher failed; retrying in 2 s")
                self._stop.wait(2.0)
            finally:
                if consumer is not None:
                    consumer.close()
                    consumer = None

    def _consume(self, consumer: ProtoConsumer[pb.common.CheckpointEvent]) -> None:
        while not self._stop.is_set():
            records = consumer.poll(timeout_s=0.5)
            if consumer.assignment():
                self.assigned.set()
            for record in records:
                if self._stop.is_set():
                    return
                if record.value is None:
                    logger.warning(
                        "skipping an unreadable checkpoint event",
                        extra={"partition": record.partition, "offset": record.offset, "error": record.error},
                    )
                elif record.value.promoted:
                    self._dispatch(record.value)
                consumer.commit({record.tp: record.offset + 1})
                self.handled += 1

    def _dispatch(self, event: pb.common.CheckpointEvent) -> None:
        started = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(self.handle(event), self.loop)
        try:
            future.result(self.handle_timeout_s)
        except Exception:
            # The handler counts and logs refusals; a swap that failed is not retried (the next promotion is).
            logger.debug("promoted checkpoint not served", exc_info=True)
        logger.debug("handled checkpoint event", extra={"version": event.version, "s": time.perf_counter() - started})
