"""`distillery broker check`: does a Kafka-protocol broker give the semantics this project relies on?

Produce/consume, the idempotent producer, consumer-group rebalances (also after a member is killed), committed
offsets, ListOffsets, headers, Debian's kcat and — when the check started the broker itself — that a kill -9 and
restart (of the broker, and of its storage server where it has one) keep every acknowledged record and committed
offset. `produce-timing` reports what acks=all costs. Each check reports pass, fail or skip with a reason; nothing
here is tied to one broker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

PARTITIONS = 4
#: What the services use (KafkaSettings.session_timeout_ms): rebalances are timed with it.
SESSION_TIMEOUT_MS = 6_000
HEARTBEAT_MS = 2_000


@dataclass
class CheckResult:
    name: str
    status: str  # "pass", "fail" or "skip"
    reason: str
    seconds: float = 0.0


class CheckFailed(AssertionError):
    pass


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise CheckFailed(reason)


class Checker:
    """The checks against one bootstrap; `restart` (kill -9 + start again, returns the bootstrap) enables durability,
    `restart_store` (kill -9 of the broker and of the storage server behind it, start both) its second case."""

    def __init__(
        self, bootstrap: str, restart: Callable[[], str] | None = None, restart_store: Callable[[], str] | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self.restart = restart
        self.restart_store = restart_store
        self.run_id = uuid.uuid4().hex[:8]

    # helpers ---------------------------------------------------------------------------------------------------
    def topic(self, name: str, partitions: int = PARTITIONS) -> str:
        topic = f"check.{self.run_id}.{name}"
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        try:
            admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        finally:
            admin.close()
        return topic

    def producer(self, **kwargs: Any) -> KafkaProducer:
        return KafkaProducer(bootstrap_servers=self.bootstrap, **{"acks": "all", "linger_ms": 0, **kwargs})

    def consumer(self, **kwargs: Any) -> KafkaConsumer:
        defaults: dict[str, Any] = {
            "auto_offset_reset": "earliest",
            "enable_auto_commit": False,
            "session_timeout_ms": SESSION_TIMEOUT_MS,
            "heartbeat_interval_ms": HEARTBEAT_MS,
            "request_timeout_ms": SESSION_TIMEOUT_MS + 5_000,
        }
        return KafkaConsumer(bootstrap_servers=self.bootstrap, **{**defaults, **kwargs})

    def produce(self, topic: str, n: int, partition: int | None = None, **kwargs: Any) -> dict[tuple[int, int], bytes]:
        """Sends n records, waits for every acknowledgement; returns (partition, offset) → value."""
        producer = self.producer(**kwargs)
        try:
            futures = [
                (value, producer.send(topic, key=f"k{i}".encode(), value=value, partition=partition))
                for i in range(n)
                for value in [f"{self.run_id}-{topic}-{i}".encode()]
            ]
            acked = {}
            for value, future in futures:
                meta = future.get(timeout=30)
                acked[(meta.partition, meta.offset)] = value
            return acked
        finally:
            producer.close()

    def read_all(self, topic: str, expect: int, timeout_s: float = 20.0) -> dict[tuple[int, int], bytes]:
        """Reads the topic from its start without a group, until `expect` records or the timeout."""
        consumer = self.consumer()
        try:
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            seen: dict[tuple[int, int], bytes] = {}
            deadline = time.monotonic() + timeout_s
            while len(seen) < expect and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=500).values():
                    for r in records:
                        seen[(r.partition, r.offset)] = r.value
            return seen
        finally:
            consumer.close()

    # checks ----------------------------------------------------------------------------------------------------
    def check_produce_consume(self) -> str:
        topic = self.topic("basic")
        acked = self.produce(topic, 200)
        seen = self.read_all(topic, len(acked))
        _require(seen == acked, f"read {len(seen)} of {len(acked)} acknowledged records (or different values)")
        return f"200 keyed records over {PARTITIONS} partitions, acks=all, all read back at their offsets"

    def check_idempotent_producer(self) -> str:
        topic = self.topic("idempotent", partitions=1)
        producer = self.producer(enable_idempotence=True)
        try:
            futures = [producer.send(topic, value=f"i{i}".encode()) for i in range(100)]
            offsets = [f.get(timeout=30).offset for f in futures]
            pid = producer._transaction_manager.producer_id_and_epoch.producer_id  # type: ignore[union-attr]
        finally:
            producer.close()
        _require(pid >= 0, f"InitProducerId returned producer id {pid}")
        _require(offsets == list(range(100)), f"offsets {offsets[:5]}… are not 0..99")
        values = [v for _, v in sorted(self.read_all(topic, 100).items())]
        _require(values == [f"i{i}".encode() for i in range(100)], f"read {len(values)} records, not 100 in order")
        return f"producer id {pid}; 100 records at offsets 0..99, once each, in order"

    def check_headers(self) -> str:
        topic = self.topic("headers", partitions=1)
        headers = [("schema", b"distillery.common.v1.Prompt"), ("empty", b""), ("binary", bytes(range(256))),
                   ("dup", b"1"), ("dup", b"2")]  # fmt: skip
        producer = self.producer()
        try:
            producer.send(topic, value=b"v", headers=headers).get(timeout=30)
        finally:
            producer.close()
        consumer = self.consumer()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            got: list[Any] = []
            deadline = time.monotonic() + 20
            while not got and time.monotonic() < deadline:
                got = [r for rs in consumer.poll(timeout_ms=500).values() for r in rs]
        finally:
            consumer.close()
        _require(bool(got), "the record did not come back")
        back = [(k, bytes(v) if v is not None else b"") for k, v in got[0].headers]
        _require(back == headers, f"headers came back as {back[:3]}…")
        return "5 headers (empty, 256 binary bytes, a repeated key) round-trip in order"

    def check_list_offsets(self) -> str:
        topic = self.topic("offsets")
        counts = {0: 13, 1: 5, 2: 1, 3: 0}
        # Partition 0: batches of 5, 5 and 3 records (end offsets must count records, not batches); the others get
        # one produce request per record.
        batched = self.producer(linger_ms=100)
        try:
            for size in (5, 5, 3):
                futures = [batched.send(topic, value=b"b", partition=0) for _ in range(size)]
                batched.flush()
                [f.get(timeout=30) for f in futures]
        finally:
            batched.close()
        for partition in (1, 2, 3):
            for _ in range(counts[partition]):
                self.produce(topic, 1, partition=partition)
        consumer = self.consumer()
        try:
            tps = [TopicPartition(topic, p) for p in counts]
            earliest = {tp.partition: o for tp, o in consumer.beginning_offsets(tps).items()}
            latest = {tp.partition: o for tp, o in consumer.end_offsets(tps).items()}
        finally:
            consumer.close()
        _require(earliest == dict.fromkeys(counts, 0), f"earliest offsets {earliest}, expected all 0")
        _require(latest == counts, f"latest offsets {latest}, expected {counts}")
        late = self.consumer(group_id=f"check-{self.run_id}-latest", auto_offset_reset="latest")
        try:
            late.assign([TopicPartition(topic, 0)])
            position = late.position(TopicPartition(topic, 0))
        finally:
            late.close()
        _require(position == 13, f"auto_offset_reset=latest positioned at {position}, expected 13")
        return f"earliest {earliest}, latest {latest}; auto_offset_reset=latest starts at 13"

    def _commit(self, group: str, offsets: dict[TopicPartition, int]) -> None:
        consumer = self.consumer(group_id=group)
        try:
            consumer.assign(list(offsets))
            consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        finally:
            consumer.close()

    def _committed(self, group: str, tps: list[TopicPartition]) -> dict[int, int | None]:
        consumer = self.consumer(group_id=group)
        try:
            return {tp.partition: consumer.committed(tp) for tp in tps}
        finally:
            consumer.close()

    def check_committed_offsets(self) -> str:
        topic = self.topic("commits")
        self.produce(topic, 40)
        group = f"check-{self.run_id}-commits"
        first = self.consumer(group_id=group)
        consumed = 0
        try:
            first.subscribe([topic])
            deadline = time.monotonic() + 30
            while consumed < 20 and time.monotonic() < deadline:
                consumed += sum(len(rs) for rs in first.poll(timeout_ms=500, max_records=20 - consumed).values())
            first.commit()
        finally:
            first.close()
        _require(consumed == 20, f"the first consumer read {consumed} records, expected 20")
        second = self.consumer(group_id=group)
        rest = 0
        try:
            second.subscribe([topic])
            deadline = time.monotonic() + 30
            while rest < 20 and time.monotonic() < deadline:
                rest += sum(len(rs) for rs in second.poll(timeout_ms=500).values())
            extra = sum(len(rs) for rs in second.poll(timeout_ms=500).values())
        finally:
            second.close()
        _require(rest + extra == 20, f"after a restart the group read {rest + extra} records, expected the other 20")
        return "a consumer committed after 20 of 40 records; a new consumer in its group read exactly the other 20"

    def check_rebalance(self) -> str:
        topic = self.topic("rebalance")
        group = f"check-{self.run_id}-rebalance"
        assignments: dict[str, set[int]] = {"a": set(), "b": set()}
        stop = {"a": threading.Event(), "b": threading.Event()}
        errors: list[str] = []

        def member(name: str) -> None:
            consumer = self.consumer(group_id=group)
            try:
                consumer.subscribe([topic])
                while not stop[name].is_set():
                    consumer.poll(timeout_ms=200)
                    assignments[name] = {tp.partition for tp in consumer.assignment()}
            except Exception as exc:  # reported as the check's failure
                errors.append(f"{name}: {exc!r}")
            finally:
                consumer.close()  # LeaveGroup: the other member takes over at once
                assignments[name] = set()

        def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 45.0) -> float:
            start = time.monotonic()
            while not predicate():
                _require(not errors, "; ".join(errors))
                _require(
                    time.monotonic() - start < timeout_s, f"{what} not reached within {timeout_s:.0f}s: {assignments}"
                )
                time.sleep(0.05)
            return time.monotonic() - start

        everything = set(range(PARTITIONS))
        threads = {n: threading.Thread(target=member, args=(n,), daemon=True) for n in ("a", "b")}
        try:
            threads["a"].start()
            t_join = wait_for(lambda: assignments["a"] == everything, "one member owning all partitions")
            threads["b"].start()
            t_split = wait_for(
                lambda: bool(assignments["a"]) and bool(assignments["b"])
                and assignments["a"] | assignments["b"] == everything and not assignments["a"] & assignments["b"],
                "two members splitting the partitions",
            )  # fmt: skip
            split = dict(assignments)
            stop["b"].set()
            threads["b"].join(30)
            t_leave = wait_for(lambda: assignments["a"] == everything, "the remaining member owning all partitions")
        finally:
            for event in stop.values():
                event.set()
            for thread in threads.values():
                if thread.is_alive():
                    thread.join(30)
        return (
            f"first member got all {PARTITIONS} partitions in {t_join:.1f}s; a second joined and they split them "
            f"{sorted(split['a'])}/{sorted(split['b'])} in {t_split:.1f}s; after it left the first took all back in "
            f"{t_leave:.1f}s (session timeout {SESSION_TIMEOUT_MS} ms)"
        )

    def _kill_and_count(
        self, name: str, settle_s: float, restart: Callable[[], str] | None = None
    ) -> tuple[int, int, int, int]:
        """Produces and commits, waits `settle_s`, kill -9 + restart; returns (records lost, acked, commits lost,
        committed). A lost topic counts all its records as lost."""
        restart = restart or self.restart
        assert restart is not None
        topic = self.topic(name)
        acked = self.produce(topic, 300)
        group = f"check-{self.run_id}-{name}"
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        commits = {tp: 1 + tp.partition for tp in tps}
        self._commit(group, commits)
        time.sleep(settle_s)
        self.bootstrap = restart()
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        try:
            exists = topic in set(admin.list_topics())
        finally:
            admin.close()
        if not exists:
            return len(acked), len(acked), len(commits), len(commits)
        seen = self.read_all(topic, len(acked), timeout_s=10)
        lost = sum(1 for k, v in acked.items() if seen.get(k) != v)
        committed = self._committed(group, tps)
        wrong = sum(1 for tp in tps if committed.get(tp.partition) != commits[tp])
        return lost, len(acked), wrong, len(commits)

    def check_dead_member(self) -> str:
        """A member killed with SIGKILL never leaves the group: its session must expire and a new member take over
        (what a crashed service needs: its replacement joins while the old member still holds the partitions)."""
        topic = self.topic("dead-member")
        group = f"check-{self.run_id}-dead"
        member = (
            "import sys\n"
            "from kafka import KafkaConsumer\n"
            f"c = KafkaConsumer(bootstrap_servers={self.bootstrap!r}, group_id={group!r}, enable_auto_commit=False,"
            f" session_timeout_ms={SESSION_TIMEOUT_MS}, heartbeat_interval_ms={HEARTBEAT_MS},"
            f" request_timeout_ms={SESSION_TIMEOUT_MS + 5_000})\n"
            f"c.subscribe([{topic!r}])\n"
            "while not c.assignment():\n    c.poll(timeout_ms=200)\n"
            "print(len(c.assignment()), flush=True)\n"
            "while True:\n    c.poll(timeout_ms=200)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", member], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            _require(line == str(PARTITIONS), f"the first member did not get the partitions ({line!r})")
        finally:
            proc.kill()
            proc.wait(10)
        limit_s = 30.0
        consumer = self.consumer(group_id=group)
        start = time.monotonic()
        try:
            consumer.subscribe([topic])
            while len(consumer.assignment()) < PARTITIONS and time.monotonic() - start < limit_s:
                consumer.poll(timeout_ms=200)
            got = len(consumer.assignment())
        finally:
            consumer.close()
        took = time.monotonic() - start
        _require(got == PARTITIONS, f"{took:.0f}s after a member was killed, a new member holds {got} of {PARTITIONS}"
                 f" partitions (session timeout {SESSION_TIMEOUT_MS} ms)")  # fmt: skip
        return f"a member was killed with SIGKILL; a new member got all {PARTITIONS} partitions after {took:.1f}s"

    def check_restart_durability(self) -> str:
        if self.restart is None:
            raise _Skip("the check did not start this broker, so it cannot kill and restart it")
        # First right after the last acknowledgement and commit (what "durable" means), then after 2 s of quiet
        # (what a broker that saves in the background keeps).
        cases = [("kill -9 right after the acks", self._kill_and_count("durable-now", 0.0)),
                 ("kill -9 2 s later", self._kill_and_count("durable-later", 2.0))]  # fmt: skip
        if self.restart_store is not None:
            figures = self._kill_and_count("durable-store", 0.0, self.restart_store)
            cases.append(("kill -9 of the broker and its storage server right after the acks", figures))

        def say(figures: tuple[int, int, int, int]) -> str:
            return f"lost {figures[0]} of {figures[1]} acknowledged records and {figures[2]} of {figures[3]} commits"

        reason = "; ".join(f"{what}: {say(figures)}" for what, figures in cases)
        _require(all(figures[0] == 0 and figures[2] == 0 for _, figures in cases), reason)
        return reason

    def check_produce_timing(self) -> str:
        """What acks=all costs on this broker: 1,000 small records from an idempotent producer, each send waited for
        (latency), then 1,000 of 1 KiB sent at once (throughput: batches of up to 16 KiB, kafka-python's default). A
        figure, not a verdict: it fails only on errors."""
        topic = self.topic("timing", partitions=1)
        n = 1_000
        producer = self.producer(enable_idempotence=True)
        try:
            producer.send(topic, value=b"warm-up").get(timeout=30)
            latencies = []
            for i in range(n):
                start = time.perf_counter()
                producer.send(topic, value=f"one-{i}".encode()).get(timeout=30)
                latencies.append(time.perf_counter() - start)
            start = time.perf_counter()
            kib = bytes(1024)
            futures = [producer.send(topic, value=kib) for _ in range(n)]
            producer.flush()
            [f.get(timeout=30) for f in futures]
            bulk_s = time.perf_counter() - start
        finally:
            producer.close()
        latencies.sort()
        ms = [1000 * latencies[int(q * (n - 1))] for q in (0.5, 0.99)]
        return (
            f"{n} records one at a time: {sum(latencies):.1f}s, median {ms[0]:.1f} ms, p99 {ms[1]:.1f} ms per "
            f"acknowledged send; {n} of 1 KiB at once: {bulk_s:.2f}s ({n / bulk_s:,.0f} records/s); "
            "acks=all, idempotent"
        )

    def check_kcat(self) -> str:
        kcat = shutil.which("kcat") or shutil.which("kafkacat")
        if kcat is None:
            raise _Skip("kcat is not on PATH (Debian: apt-get install kcat)")
        topic = self.topic("kcat", partitions=1)
        listing = subprocess.run([kcat, "-b", self.bootstrap, "-L", "-m", "10"], capture_output=True, text=True,
                                 timeout=30)  # fmt: skip
        said = (listing.stderr or listing.stdout).strip()[-300:]
        _require(listing.returncode == 0 and topic in listing.stdout, f"kcat -L failed ({listing.returncode}): {said}")
        lines = [f"key{i}:value{i}" for i in range(10)]
        produced = subprocess.run(
            [kcat, "-b", self.bootstrap, "-P", "-t", topic, "-K:", "-X", "acks=all", "-m", "10"],
            input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        _require(produced.returncode == 0, f"kcat -P failed: {produced.stderr.strip()[-300:]}")
        consumed = subprocess.run(
            [kcat, "-b", self.bootstrap, "-C", "-t", topic, "-o", "beginning", "-e", "-K:", "-m", "10"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        got = consumed.stdout.strip().splitlines()
        said = consumed.stderr.strip()[-300:]
        _require(consumed.returncode == 0 and got == lines, f"kcat -C read {len(got)} of 10 records: {said}")
        python_side = self.read_all(topic, 10)
        _require(len(python_side) == 10, f"kafka-python read {len(python_side)} of kcat's 10 records")
        return f"{Path(kcat).name} -L lists the topic; kcat produced and consumed 10 keyed records, kafka-python too"

    def run(self, only: list[str] | None = None) -> list[CheckResult]:
        checks = [
            ("produce-consume", self.check_produce_consume),
            ("idempotent-producer", self.check_idempotent_producer),
            ("headers", self.check_headers),
            ("list-offsets", self.check_list_offsets),
            ("committed-offsets", self.check_committed_offsets),
            ("group-rebalance", self.check_rebalance),
            ("dead-member", self.check_dead_member),
            ("kcat", self.check_kcat),
            ("produce-timing", self.check_produce_timing),
            ("restart-durability", self.check_restart_durability),  # last: it kills the broker
        ]
        results = []
        for name, check in checks:
            if only and name not in only:
                continue
            start = time.monotonic()
            try:
                results.append(CheckResult(name, "pass", check(), time.monotonic() - start))
            except _Skip as skip:
                results.append(CheckResult(name, "skip", str(skip)))
            except Exception as exc:  # every failure is a result with its reason, never a crash of the check
                reason = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
                results.append(CheckResult(name, "fail", reason, time.monotonic() - start))
        return results


class _Skip(Exception):
    pass


@contextlib.contextmanager
def started_broker(engine: str) -> Iterator[tuple[str, Callable[[], str], Callable[[], str] | None]]:
    """An embedded broker of `engine` in a fresh temporary home; yields its bootstrap, a kill -9 + restart of the
    broker, and (for tansu-s3; else None) a kill -9 of the broker and its S3 server + restart of both."""
    from services.common import broker, s3store

    with tempfile.TemporaryDirectory(prefix="distillery-broker-check-") as tmp:
        home = Path(tmp)
        state = broker.start(home, engine=engine, die_with_caller=True)

        def kill9(pid: int) -> None:
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

        def restart() -> str:
            current = broker.status(home)
            if current is not None:
                kill9(current.pid)
            return broker.start(home, port=state.port, engine=engine, die_with_caller=True).bootstrap

        def restart_store() -> str:
            store = s3store.status(broker.state_dir(home))
            if store is not None:
                kill9(store.pid)
            return restart()

        try:
            yield state.bootstrap, restart, restart_store if engine == "tansu-s3" else None
        finally:
            broker.stop(home)


def result_dicts(results: list[CheckResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
