"""Typed Kafka plumbing over kafka-python: protobuf values, string keys, schema headers, dead letters.

Producers wait for all in-sync replicas (`acks="all"`), are idempotent and compress; a record larger than
`max_message_bytes` fails here, loudly, before the broker sees it. An idempotent producer that lost its broker
(a restart) is left in an error state by kafka-python (UnknownProducerIdError, a failed InitProducerId, expired
batches): `send_and_wait` rebuilds it and sends again until its deadline — a resend may duplicate a record the broker
had already written, which every consumer tolerates (records carry ids; consumers are at-least-once).
Consumers never auto-commit: callers commit offsets after their work is durable (at-least-once). Lag comes from
the high-water mark carried in fetch responses, which every broker reports correctly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, MessageSizeTooLargeError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from services.common import pb
from services.common.metrics import DEAD_LETTERS
from services.common.settings import KafkaSettings

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

SCHEMA_HEADER = "schema"
SCHEMA_VERSION_HEADER = "schema-version"
CONTENT_TYPE_HEADER = "content-type"
PROTOBUF_CONTENT_TYPE = "application/x-protobuf"
SCHEMA_VERSION = "1"


class RecordTooLarge(ValueError):
    """A record exceeds the configured `max_message_bytes`."""


class NoBroker(RuntimeError):
    """No Kafka cluster is configured and no embedded broker is running."""


def resolve_bootstrap(settings: KafkaSettings) -> str:
    """`DISTILLERY_KAFKA_BOOTSTRAP` when set; else the embedded broker started by `distillery broker start`."""
    if settings.bootstrap:
        return settings.bootstrap
    from services.common import broker

    state = broker.status()
    if state is None:
        raise NoBroker("no Kafka cluster: set DISTILLERY_KAFKA_BOOTSTRAP=host:port, or run `distillery broker start`")
    return state.bootstrap


def schema_headers(message: Message, extra: Mapping[str, str] | None = None) -> list[tuple[str, bytes]]:
    headers = {
        SCHEMA_HEADER: message.DESCRIPTOR.full_name,
        SCHEMA_VERSION_HEADER: SCHEMA_VERSION,
        CONTENT_TYPE_HEADER: PROTOBUF_CONTENT_TYPE,
        **(extra or {}),
    }
    return [(k, v.encode()) for k, v in headers.items()]


def ensure_topics(settings: KafkaSettings, topics: Iterable[str] | None = None) -> list[str]:
    """Creates the topics that do not exist yet (idempotent); returns the ones it created."""
    wanted = list(topics) if topics is not None else settings.topics()
    admin = KafkaAdminClient(
        bootstrap_servers=resolve_bootstrap(settings),
        client_id=f"{settings.client_id}-admin",
        request_timeout_ms=settings.request_timeout_ms,
        **settings.client_security(),
    )
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        created = []
        for topic in missing:
            try:
                admin.create_topics(
                    [NewTopic(topic, settings.partitions, settings.replication_factor)], timeout_ms=10_000
                )
                created.append(topic)
            except TopicAlreadyExistsError:
                pass  # another service created it first
        if created:
            logger.info("created topics", extra={"topics": created, "partitions": settings.partitions})
        return created
    finally:
        admin.close()


class ProtoProducer:
    """Sends protobuf messages keyed by a string id, with schema headers."""

    def __init__(self, settings: KafkaSettings, client_name: str) -> None:
        self.settings = settings
        self.max_bytes = settings.max_message_bytes
        self._producer = KafkaProducer(
            bootstrap_servers=resolve_bootstrap(settings),
            client_id=f"{settings.client_id}-{client_name}",
            acks="all",
            enable_idempotence=True,
            compression_type=None if settings.compression == "none" else settings.compression,
            linger_ms=settings.linger_ms,
            # Leave room for the record batch framing around a value of max_message_bytes.
            max_request_size=settings.max_message_bytes + 64 * 1024,
            request_timeout_ms=settings.request_timeout_ms,
            **settings.client_security(),
        )

        self._lock = threading.Lock()
        self.rebuilds = 0

    def send(
        self,
        topic: str,
        key: str,
        message: Message,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Queues one record and returns kafka-python's future (`.get(timeout)` waits for the broker's ack)."""
        value = message.SerializeToString()
        return self.send_raw(topic, key.encode(), value, schema_headers(message, headers))

    def send_and_wait(
        self,
        topic: str,
        key: str,
        message: Message,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> Any:
        """Sends one record and waits for the broker's acknowledgement, rebuilding the producer and sending again
        after a failure (a broker restart) until `timeout_s`; returns the record's metadata or raises the last error.
        """
        deadline = time.monotonic() + timeout_s
        backoff = 0.2
        while True:
            generation = self.rebuilds
            try:
                return self.send(topic, key, message, headers).get(timeout=max(0.1, deadline - time.monotonic()))
            except (RecordTooLarge, MessageSizeTooLargeError):
                raise  # the record is the problem, not the producer
            except KafkaError as exc:
                if time.monotonic() + backoff >= deadline:
                    raise
                logger.warning("send failed; rebuilding the producer and sending again", extra={"error": repr(exc)})
                time.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self.recover(generation)

    def recover(self, seen: int | None = None) -> None:
        """Replaces the producer with a fresh one (new producer id, new connections), same configuration.

        kafka-python keeps an idempotent producer that met a fatal producer-id error failing every later send; only a
        new producer gets a new id from the (restarted) broker. Records still queued in the old one are dropped:
        callers resend what was not acknowledged. `seen`: the `rebuilds` count the caller's failed send went out
        under; when another caller rebuilt since, nothing is done (many failed sends, one rebuild).
        """
        with self._lock:
            if seen is not None and seen != self.rebuilds:
                return
            old = self._producer
            # The running producer's own configuration (every constructor argument, security settings included).
            config = {k: v for k, v in old.config.items() if k in KafkaProducer.DEFAULT_CONFIG}
            try:
                old.close(timeout=0)
            except Exception:  # a producer in a fatal state may fail to close cleanly; it is dropped either way
                logger.debug("closing the failed producer raised", exc_info=True)
            self._producer = KafkaProducer(**config)
            self.rebuilds += 1

    def send_raw(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        if len(value) > self.max_bytes:
            raise RecordTooLarge(
                f"record for topic {topic!r} is {len(value)} bytes, over max_message_bytes={self.max_bytes}"
            )
        return self._producer.send(topic, key=key, value=value, headers=headers)

    def flush(self, timeout_s: float | None = None) -> None:
        """Blocks until every queued record is acknowledged (raises if one failed)."""
        self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.close(timeout=timeout_s)


@dataclass
class Received(Generic[M]):
    """One consumed record: decoded `value`, or `error` saying why it could not be decoded."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes
    headers: dict[str, str]
    value: M | None = None
    error: str | None = None
    timestamp_ms: int = 0
    #: The dead letter's `error_type` when `error` is set: "schema" (header missing or names another message),
    #: "malformed" (does not parse) or "invalid" (parses, fails the consumer's validation).
    error_type: str = "malformed"

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


Validator = Callable[[Any], None]


def decode(
    message_type: type[M], raw: bytes, headers: Mapping[str, str], validate: Validator | None = None
) -> tuple[M | None, str | None, str]:
    """Parses `raw` as `message_type`: (message, None, _) or (None, reason, kind of failure — `Received.error_type`).

    A record must name its message type in the `schema` header: protobuf bytes of one message often parse as
    another (a CheckpointEvent parses as a PromptRecord), so a record without the header is refused, not guessed.
    """
    want = message_type.DESCRIPTOR.full_name
    schema = headers.get(SCHEMA_HEADER)
    if schema is None:
        return None, f"no {SCHEMA_HEADER!r} header: a record must name its message type ({want!r})", "schema"
    if schema != want:
        return None, f"schema header {schema!r} is not {want!r}", "schema"
    version = headers.get(SCHEMA_VERSION_HEADER)
    if version is not None and version != SCHEMA_VERSION:
        return None, f"schema-version header {version!r} is not {SCHEMA_VERSION!r}", "schema"
    message = message_type()
    try:
        message.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        return None, f"not a valid {want}: {exc}", "malformed"
    if validate is not None:
        try:
            validate(message)
        except ValueError as exc:
            return None, f"invalid {want}: {exc}", "invalid"
    return message, None, "malformed"


class ProtoConsumer(Generic[M]):
    """A consumer-group member reading one protobuf type; offsets are committed only by `commit`."""

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        message_type: type[M],
        group_id: str,
        client_name: str,
        validate: Validator | None = None,
        listener: ConsumerRebalanceListener | None = None,
        max_poll_records: int = 500,
    ) -> None:
        self.topic = topic
        self.message_type = message_type
        self.validate = validate
        self._pending: list[Received[M]] = []
        self._consumer = KafkaConsumer(
            bootstrap_servers=resolve_bootstrap(settings),
            client_id=f"{settings.client_id}-{client_name}",
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            request_timeout_ms=max(settings.request_timeout_ms, settings.session_timeout_ms + 5_000),
            max_poll_records=max_poll_records,
            isolation_level="read_committed",
            **settings.client_security(),
        )
        if listener is not None:
            self._consumer.subscribe([topic], listener=listener)
        else:
            self._consumer.subscribe([topic])

    @property
    def kafka(self) -> KafkaConsumer:
        return self._consumer

    def poll(self, timeout_s: float = 1.0, max_records: int | None = None) -> list[Received[M]]:
        """Returns the next records in partition order; undecodable ones carry `error` instead of `value`."""
        if self._pending:
            out, self._pending = self._pending, []
            return out
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return self._decode_batches(batches)

    def _decode_batches(self, batches: Mapping[TopicPartition, list[Any]]) -> list[Received[M]]:
        out: list[Received[M]] = []
        for tp, records in batches.items():
            for rec in records:
                headers = {k: (v or b"").decode("utf-8", "replace") for k, v in (rec.headers or [])}
                raw = rec.value or b""
                value, error, error_type = decode(self.message_type, raw, headers, self.validate)
                out.append(
                    Received(
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=rec.offset,
                        key=rec.key,
                        raw=raw,
                        headers=headers,
                        value=value,
                        error=error,
                        timestamp_ms=rec.timestamp or 0,
                        error_type=error_type,
                    )
                )
        return out

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commits `{partition: next offset to read}` (i.e. last processed offset + 1)."""
        if offsets:
            self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})

    def commit_async(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Sends a commit without waiting for it (failures are logged): the only commit a rebalance listener can make,
        since kafka-python runs listeners on its IO thread, where a blocking `commit` raises."""

        def done(_offsets: object, response: object) -> None:
            if isinstance(response, Exception):
                logger.warning("offset commit failed: %r", response)

        if offsets:
            self._consumer.commit_async(
                {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}, callback=done
            )

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(tp, offset)

    def lag(self) -> int | None:
        """Records not yet returned on the assigned partitions, from the high-water marks of fetch responses.

        None until every assigned partition has been fetched at least once.
        """
        assigned = self._consumer.assignment()
        if not assigned:
            return None
        total = 0
        for tp in assigned:
            high = self._consumer.highwater(tp)
            pos = self._consumer.position(tp)
            if high is None or pos is None:
                return None
            total += max(0, high - pos)
        return total + len(self._pending)

    def wait_for_assignment(self, timeout_s: float = 30.0) -> set[TopicPartition]:
        """Polls (without returning records) until the group assigned partitions; for tests and start-up."""
        deadline = time.monotonic() + timeout_s
        while not self._consumer.assignment():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no partitions of {self.topic!r} assigned within {timeout_s}s")
            # poll drives the group protocol; records it returns are kept for the next `poll` call.
            self._pending.extend(self._decode_batches(self._consumer.poll(timeout_ms=100)))
        return self.assignment()

    def close(self) -> None:
        self._consumer.close(autocommit=False)


@dataclass
class DeadLetterWriter:
    """Sends a record a consumer could not use, raw bytes and all, to the dead-letter topic with a reason."""

    producer: ProtoProducer
    topic: str
    service: str
    sent: int = field(default=0)

    def send(self, record: Received[Any], reason: str, error_type: str = "malformed") -> None:
        now = Timestamp()
        now.GetCurrentTime()
        letter = pb.common.DeadLetter(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key or b"",
            value=record.raw,
            reason=reason,
            error_type=error_type,
            headers=record.headers,
            service=self.service,
            dead_lettered_at=now,
        )
        key = (record.key or b"").decode("utf-8", "replace") or f"{record.topic}/{record.partition}/{record.offset}"
        data = letter.SerializeToString()
        if len(data) > self.producer.max_bytes:
            # Keep the reason and the coordinates even when the value itself is what was too big.
            letter.value = record.raw[: self.producer.max_bytes // 2]
            letter.reason = f"{reason} (value truncated from {len(record.raw)} bytes)"
        self.producer.send_and_wait(self.topic, key, letter, {"reason": reason[:200]}, timeout_s=30)
        self.sent += 1
        DEAD_LETTERS.labels(record.topic).inc()
        logger.warning(
            "dead-lettered a record",
            extra={"topic": record.topic, "partition": record.partition, "offset": record.offset, "reason": reason},
        )
