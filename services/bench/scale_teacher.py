"""Teacher replicas in one consumer group: samples/s of n workers, and the takeover after kill -9 of one.

`measure_teacher(n)` starts an embedded broker (unless given a bootstrap) and n `distillery teacher serve` processes
in one consumer group (the tiny random Llama unless given a model; each engine on a core of its own), waits until
the group settled, feeds prompts and reads the samples topic back until every prompt has a sample. With n ≥ 2
it then feeds as many prompts again, kills one worker with SIGKILL once it is publishing, and times the takeover:
from the kill until the survivors' `distillery_teacher_prompt_partitions_assigned` add up to every partition (the
dead member's session has to time out first). A prompt without a sample is lost; a sample id read twice is a
duplicate (the trainer drops those).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from services.common import broker, pb
from services.common.kafka import ProtoConsumer, ensure_topics
from services.common.metrics import read_metrics
from services.common.process import ServiceProcess
from services.common.settings import KafkaSettings
from services.teacher.prompts import publish

PARTITIONS_OWNED = "distillery_teacher_prompt_partitions_assigned"
SAMPLES_PUBLISHED = "distillery_teacher_samples_published_total"
IN_FLIGHT = "distillery_teacher_prompts_in_flight"


def worker_env(model: Path, kafka: KafkaSettings, group: str, cores: list[int] | None, max_num_seqs: int = 8) -> dict:
    """`distillery teacher serve` settings of one replica: a small CPU engine, the group and topics of `kafka`."""
    env = {
        "DISTILLERY_TEACHER_MODEL": str(model),
        "DISTILLERY_TEACHER_GRACE_PERIOD_S": "1",
        "DISTILLERY_TEACHER_LOG_FORMAT": "text",
        "DISTILLERY_TEACHER_VLLM__ENFORCE_EAGER": "true",
        "DISTILLERY_TEACHER_VLLM__KV_CACHE_GIB": "0.25",
        "DISTILLERY_TEACHER_VLLM__MAX_MODEL_LEN": "256",
        "DISTILLERY_TEACHER_VLLM__MAX_NUM_SEQS": str(max_num_seqs),
        "DISTILLERY_TEACHER_WORKER__BATCH_SIZE": str(max_num_seqs),
        "DISTILLERY_TEACHER_WORKER__GROUP_ID": group,
        "DISTILLERY_TEACHER_WORKER__COMMIT_INTERVAL_S": "0.2",
        "DISTILLERY_KAFKA_BOOTSTRAP": str(kafka.bootstrap),
        "DISTILLERY_KAFKA_PARTITIONS": str(kafka.partitions),
        "DISTILLERY_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
        "DISTILLERY_KAFKA_HEARTBEAT_INTERVAL_MS": str(kafka.heartbeat_interval_ms),
        "DISTILLERY_KAFKA_TOPIC_PROMPTS": kafka.topic_prompts,
        "DISTILLERY_KAFKA_TOPIC_TEACHER_SAMPLES": kafka.topic_teacher_samples,
        "DISTILLERY_KAFKA_TOPIC_CHECKPOINTS": kafka.topic_checkpoints,
        "DISTILLERY_KAFKA_TOPIC_DEAD_LETTERS": kafka.topic_dead_letters,
    }
    if cores:
        env["DISTILLERY_TEACHER_VLLM__CPU_BIND"] = ",".join(map(str, cores))
        env["DISTILLERY_TEACHER_VLLM__OMP_THREADS"] = str(len(cores))
    return env


def split_cores(n: int, per_worker: int | None = None) -> list[list[int] | None]:
    """Each of n workers gets its own cores of this process's: `per_worker` each (default: an equal share of all);
    None (unpinned) when there are too few."""
    cores = sorted(os.sched_getaffinity(0))
    share = per_worker or len(cores) // max(n, 1)
    if share < 1 or n * share > len(cores):
        return [None] * n
    return [cores[i * share : (i + 1) * share] for i in range(n)]


def owned(process: ServiceProcess) -> int | None:
    """Prompt partitions the worker owns now, from its /metrics; None while it cannot be read."""
    try:
        value = read_metrics(process.metrics_url, timeout_s=2.0).get(PARTITIONS_OWNED)
    except OSError:
        return None
    return None if value is None else int(value)


def wait_until(done: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> float:
    """Polls `done` until true; returns the seconds it took, or raises TimeoutError naming `what`."""
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(poll_s)
    return time.monotonic() - started


def settled(workers: list[ServiceProcess], partitions: int) -> bool:
    """Every partition owned, by as many workers as can own one (a rebalance finished)."""
    counts = [owned(w) for w in workers]
    if any(c is None for c in counts):
        return False
    return sum(counts) == partitions and sum(1 for c in counts if c) == min(len(workers), partitions)  # type: ignore[misc, arg-type]


class SampleReader:
    """Reads the samples topic from its start in a group of its own: samples, tokens and duplicates per prompt."""

    def __init__(self, kafka: KafkaSettings) -> None:
        group = f"scale-reader-{uuid.uuid4().hex[:8]}"
        self.consumer = ProtoConsumer(kafka, kafka.topic_teacher_samples, pb.common.TeacherSample, group, "scale")
        self.per_prompt: dict[str, int] = {}
        self.sample_ids: set[str] = set()
        self.samples = 0
        self.tokens = 0

    @property
    def duplicates(self) -> int:
        return self.samples - len(self.sample_ids)

    def read(self, done: Callable[[], bool], timeout_s: float, check: Callable[[], None] = lambda: None) -> bool:
        """Reads until `done()` or the timeout (then returns False); `check` may raise (a worker died)."""
        deadline = time.monotonic() + timeout_s
        while not done():
            check()
            if time.monotonic() > deadline:
                return False
            for received in self.consumer.poll(timeout_s=0.2):
                if received.value is None:
                    raise RuntimeError(f"undecodable teacher sample: {received.error}")
                sample = received.value
                self.per_prompt[sample.prompt_id] = self.per_prompt.get(sample.prompt_id, 0) + 1
                self.sample_ids.add(sample.sample_id)
                self.samples += 1
                self.tokens += len(sample.completion_token_ids)
        return True

    def covered(self, prompt_ids: list[str]) -> int:
        return sum(1 for p in prompt_ids if p in self.per_prompt)

    def close(self) -> None:
        self.consumer.close()


def prompt_records(prefix: str, count: int, max_tokens: int) -> list[pb.common.PromptRecord]:
    sampling = pb.common.SamplingParams(max_tokens=max_tokens, extra={"ignore_eos": "true"})
    records = []
    for i in range(count):
        record = pb.common.PromptRecord(prompt_id=f"{prefix}{i:04d}", task="scale", sampling=sampling)
        record.chat.messages.add(role="user", content=f"Question {i}: what is {i} plus {i}?")
        records.append(record)
    return records


def kill_9(process: ServiceProcess) -> list[psutil.Process]:
    """SIGKILL to the service process alone (its engine cores must die with it); returns its family from before."""
    assert process.proc is not None
    procs = [psutil.Process(process.proc.pid), *psutil.Process(process.proc.pid).children(recursive=True)]
    os.kill(process.proc.pid, signal.SIGKILL)
    process.proc.wait(30)
    return procs


def leftovers(procs: list[psutil.Process], timeout_s: float = 30.0) -> int:
    """How many of `procs` still run after `timeout_s` (each gets SIGKILL then: nothing outlives the bench)."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return len(left)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def _bootstrap(given: str | None, home: Path) -> Iterator[tuple[str, str]]:
    if given:
        yield given, "external"
        return
    with broker.embedded(home) as state:
        yield state.bootstrap, state.engine


def measure_teacher(
    n_workers: int,
    *,
    prompts: int = 128,
    max_tokens: int = 64,
    model: Path | None = None,
    bootstrap: str | None = None,
    partitions: int = 4,
    session_timeout_ms: int = 6_000,
    kill_one: bool | None = None,
    cores_per_worker: int | None = 1,
    workdir: Path | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Throughput of `n_workers` teacher replicas, and (n ≥ 2, unless `kill_one` is False) the takeover after kill -9
    of one mid-batch. Each worker's engine is pinned to `cores_per_worker` cores of its own (None: the cores split
    evenly). One by default, so a replica gets the same whether it runs alone or beside others: on the shared
    2-core machine one worker with two OpenMP threads over both cores gave 144-172 tokens/s against 1,274 on one
    core (every barrier waits for the thread another process preempted). Times in seconds; `lost` counts prompts
    without any sample after `timeout_s`."""
    kill_one = n_workers >= 2 if kill_one is None else kill_one
    if n_workers < 1 or (kill_one and n_workers < 2):
        raise ValueError(f"n_workers={n_workers}: need at least 1, and 2 to kill one")
    with contextlib.ExitStack() as stack:
        work = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-teacher-")))
        if model is None:
            from services.common.tiny import build_llama

            model = build_llama(work / "tiny-llama")
        address, engine = stack.enter_context(_bootstrap(bootstrap, work / "broker"))
        suffix = uuid.uuid4().hex[:8]
        kafka = KafkaSettings(
            bootstrap=address,
            partitions=partitions,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=min(2_000, session_timeout_ms // 3),
            topic_prompts=f"scale.{suffix}.prompts",
            topic_teacher_samples=f"scale.{suffix}.teacher-samples",
            topic_checkpoints=f"scale.{suffix}.checkpoints",
            topic_dead_letters=f"scale.{suffix}.dead-letters",
        )
        ensure_topics(kafka)
        group = f"scale-teacher-{suffix}"
        workers = [
            ServiceProcess("teacher", worker_env(model, kafka, group, cores), work / f"teacher-{i}.log")
            for i, cores in enumerate(split_cores(n_workers, cores_per_worker))
        ]
        live = list(workers)
        stack.callback(lambda: [w.stop(grace_s=10) for w in workers])
        reader = SampleReader(kafka)
        stack.callback(reader.close)

        def check() -> None:
            for w in live:
                w.check_alive()

        started = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            w.wait_healthy(timeout_s)
        wait_until(lambda: settled(workers, partitions), timeout_s, "the group to settle")
        startup_s = time.monotonic() - started

        first = prompt_records("a", prompts, max_tokens)
        ids = [r.prompt_id for r in first]
        t0 = time.monotonic()
        publish(kafka, first)
        reader.read(lambda: reader.covered(ids) == len(ids), timeout_s, check)
        wall_s = time.monotonic() - t0
        result: dict[str, Any] = {
            "n_workers": n_workers,
            "cores": [w.env.get("DISTILLERY_TEACHER_VLLM__CPU_BIND", "unpinned") for w in workers],
            "broker": engine,
            "partitions": partitions,
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
            "prompts": prompts,
            "max_tokens": max_tokens,
            "startup_s": round(startup_s, 2),
            "wall_s": round(wall_s, 2),
            "samples": reader.samples,
            "samples_per_s": round(reader.samples / wall_s, 2),
            "tokens_per_s": round(reader.tokens / wall_s, 1),
            "duplicates": reader.duplicates,
            "lost": len(ids) - reader.covered(ids),
            "takeover": None,
        }
        if kill_one:
            live.remove(workers[0])
            result["takeover"] = takeover(workers[0], live, kafka, reader, prompts, max_tokens, timeout_s, check)
    return result


def takeover(
    victim: ServiceProcess,
    survivors: list[ServiceProcess],
    kafka: KafkaSettings,
    reader: SampleReader,
    prompts: int,
    max_tokens: int,
    timeout_s: float,
    check: Callable[[], None],
) -> dict[str, Any]:
    """Feeds a round of prompts, kills `victim` with SIGKILL while it has prompts in flight and has published some
    of the round, times the survivors' takeover of every partition, and reads until every prompt of the round has a
    sample (or the timeout)."""
    samples_before, duplicates_before = reader.samples, reader.duplicates
    published_before = read_metrics(victim.metrics_url).get(SAMPLES_PUBLISHED, 0.0)
    records = prompt_records("b", prompts, max_tokens)
    ids = [r.prompt_id for r in records]
    t0 = time.monotonic()
    publish(kafka, records)
    in_flight = 0

    def victim_busy() -> bool:
        nonlocal in_flight
        try:
            m = read_metrics(victim.metrics_url, timeout_s=2.0)
        except OSError:
            return False
        in_flight = int(m.get(IN_FLIGHT, 0))
        return in_flight > 0 and m.get(SAMPLES_PUBLISHED, 0.0) > published_before

    wait_until(victim_busy, timeout_s, "the victim to publish samples of the round", poll_s=0.05)
    family = kill_9(victim)
    killed = time.monotonic()
    rebalance_s = wait_until(
        lambda: sum(owned(s) or 0 for s in survivors) == kafka.partitions,
        timeout_s,
        "the survivors to own every partition",
    )
    reader.read(lambda: reader.covered(ids) == len(ids), timeout_s, check)
    return {
        "prompts": prompts,
        "victim_in_flight_at_kill": in_flight,
        "rebalance_s": round(rebalance_s, 2),
        "wall_s": round(time.monotonic() - t0, 2),
        "after_kill_s": round(time.monotonic() - killed, 2),
        "samples": reader.samples - samples_before,
        "duplicates": reader.duplicates - duplicates_before,
        "lost": len(ids) - reader.covered(ids),
        "leftover_processes": leftovers(family),
    }
