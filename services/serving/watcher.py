"""Checkpoint watcher: follows the checkpoints topic and swaps to every promoted checkpoint.

Each replica reads in its own consumer group (every replica must see every promotion), from the earliest offset:
events not newer than the served version are ignored cheaply, so replaying the topic at start-up costs little. A
replica keeps no state of its own: at start it serves the newest promoted checkpoint in the registry, and a new
group then replays the topic, so a restarted or added replica ends on the same version as the others.
kafka-python is blocking, so the consumer runs on a thread and hands each event to the event loop, waits for the
swap to finish (or fail), and only then commits the offset. An event it cannot use — undecodable, without a schema
header, invalid (no version or registry URI), or a promoted checkpoint serving refused (verification, load or
warm-up failed) — goes to the dead-letter topic with the reason, like every other consumer's, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from services.common import pb
from services.common.kafka import DeadLetterWriter, ProtoConsumer, ProtoProducer, Received
from services.common.settings import KafkaSettings

logger = logging.getLogger(__name__)

#: Swaps to a promoted checkpoint; returns None when served (or not newer than the served one), else why it
#: could not be used (the event is dead-lettered with that reason).
Handler = Callable[["pb.common.CheckpointEvent"], Coroutine[Any, Any, "str | None"]]


def validate_event(event: pb.common.CheckpointEvent) -> None:
    """Fields every event needs; a failing one is a dead letter."""
    if event.version <= 0:
        raise ValueError(f"version={event.version}: a registry checkpoint version is >= 1")
    if not event.registry_uri:
        raise ValueError("registry_uri is empty")


def default_group() -> str:
    """A group of this process alone. Host name and PID are not enough: in a container the service is PID 1, and
    pods with `hostNetwork` share their node's host name; two replicas in one group would split the topic's
    partitions, and one of them would miss promotions. The random part makes it unique; nothing needs the group
    to survive a restart (see the module docstring)."""
    return f"distillery-serving-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
        self.dead_lettered = 0
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
        producer: ProtoProducer | None = None
        while not self._stop.is_set():
            try:
                if producer is None:
                    producer = ProtoProducer(self.kafka, "serving-watcher")
                consumer = ProtoConsumer(
                    self.kafka,
                    self.kafka.topic_checkpoints,
                    pb.common.CheckpointEvent,
                    group_id=self.group_id,
                    client_name="serving-watcher",
                    validate=validate_event,
                    max_poll_records=16,
                )
                self._consume(consumer, DeadLetterWriter(producer, self.kafka.topic_dead_letters, "serving"))
            except Exception as exc:  # broker gone, group trouble: keep serving, retry
                self.error = exc
                logger.exception("checkpoint watcher failed; retrying in 2 s")
                self._stop.wait(2.0)
            finally:
                if consumer is not None:
                    consumer.close()
                    consumer = None
        if producer is not None:
            producer.close()

    def _consume(self, consumer: ProtoConsumer[pb.common.CheckpointEvent], dead: DeadLetterWriter) -> None:
        while not self._stop.is_set():
            records = consumer.poll(timeout_s=0.5)
            if consumer.assignment():
                self.assigned.set()
            for record in records:
                if self._stop.is_set():
                    return
                if record.value is None:
                    self._dead_letter(dead, record, record.error or "empty record", record.error_type)
                elif record.value.promoted:
                    refused = self._dispatch(record.value)
                    if refused is not None:
                        self._dead_letter(dead, record, refused, "refused")
                # A dead letter that failed to send raised above: the offset stays uncommitted, the event comes back.
                consumer.commit({record.tp: record.offset + 1})
                self.handled += 1

    def _dead_letter(self, dead: DeadLetterWriter, record: Received[Any], reason: str, error_type: str) -> None:
        dead.send(record, reason, error_type)
        self.dead_lettered += 1

    def _dispatch(self, event: pb.common.CheckpointEvent) -> str | None:
        """Runs the handler on the event loop; the reason the checkpoint was not served, or None."""
        started = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(self.handle(event), self.loop)
        try:
            refused: str | None = future.result(self.handle_timeout_s)
        except TimeoutError:
            future.cancel()
            refused = f"the swap did not finish within {self.handle_timeout_s:g} s"
        except Exception as exc:
            # A swap that failed is not retried (the next promotion is); the event says why it was not served.
            logger.debug("promoted checkpoint not served", exc_info=True)
            refused = f"{type(exc).__name__}: {exc}"[:500]
        logger.debug("handled checkpoint event", extra={"version": event.version, "s": time.perf_counter() - started})
        return refused
