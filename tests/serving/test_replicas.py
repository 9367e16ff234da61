"""Two serving replicas (`distillery serving serve` processes) on one registry and broker, under round-robin client
load through three promotions announced as the trainer announces them: both end on the same version, no request
fails, no stream mixes versions; then a replica started afresh serves the current version at once and replays the
topic without swapping."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from services.common import channels, pb
from services.common.kafka import ProtoProducer
from services.common.metrics import read_metrics
from services.common.process import ServiceProcess
from services.common.registry import Registry
from services.serving.loadtest import LoadtestConfig, run_loadtest
from services.serving.process import serving_replicas, target_of
from tests.serving.conftest import TinyModels, event_for, module_kafka, poll, register

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]

PROMOTIONS = 3


def replica_env(home: Path, kafka_bootstrap: str, topics: dict[str, str]) -> dict[str, str]:
    return {
        "DISTILLERY_HOME": str(home),
        "DISTILLERY_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DISTILLERY_KAFKA_PARTITIONS": "1",
        "DISTILLERY_KAFKA_TOPIC_CHECKPOINTS": topics["checkpoints"],
        "DISTILLERY_KAFKA_TOPIC_DEAD_LETTERS": topics["dead_letters"],
        "DISTILLERY_SERVING_REGISTRY_DIR": str(home / "registry"),
        "DISTILLERY_SERVING_VLLM__ENFORCE_EAGER": "true",
        "DISTILLERY_SERVING_VLLM__KV_CACHE_GIB": "0.25",
        "DISTILLERY_SERVING_VLLM__MAX_MODEL_LEN": "1024",
        "DISTILLERY_SERVING_VLLM__MAX_NUM_SEQS": "64",
        "DISTILLERY_SERVING_SWAP__WARMUP_TOKENS": "4",
        "DISTILLERY_SERVING_LOG_LEVEL": "INFO",
    }


async def version_of(address: str) -> int:
    async with channels.aio_channel(address) as channel:
        reply = await pb.serving_grpc.ServingServiceStub(channel).GetModel(pb.serving.GetModelRequest(), timeout=10)
        return int(reply.model.version)


def metric(replica: ServiceProcess, name: str) -> float:
    return read_metrics(replica.metrics_url).get(name, 0.0)


async def test_two_replicas_follow_three_promotions_under_load(
    kafka_bootstrap: str, tiny_models: TinyModels, tmp_path: Path
) -> None:
    kafka = module_kafka(kafka_bootstrap)
    topics = {"checkpoints": kafka.topic_checkpoints, "dead_letters": kafka.topic_dead_letters}
    env = replica_env(tmp_path, kafka_bootstrap, topics)
    registry = Registry(tmp_path / "registry")
    first = register(registry, tiny_models.v1)  # promoted before the replicas start: each finds it there
    sources = [tiny_models.v2, tiny_models.v3, tiny_models.v1][:PROMOTIONS]
    producer = ProtoProducer(kafka, "test-replicas")
    try:
        async with serving_replicas(2, env, tmp_path / "logs") as replicas:
            addresses = [r.address for r in replicas]
            assert [await version_of(a) for a in addresses] == [first.version] * 2
            # Swaps under load go to the standby engine each replica starts after its first model.
            standby = 'distillery_serving_engines{role="standby"}'
            await poll(lambda: all(metric(r, standby) == 1 for r in replicas), 600, "both standby engines", 0.5)
            stop = asyncio.Event()
            config = LoadtestConfig(
                address=target_of(replicas), concurrency=8, duration_s=None, max_streams=100_000, max_tokens=48,
                client=channels.ClientSettings(lb_policy="round_robin"),
            )  # fmt: skip
            load = asyncio.create_task(run_loadtest(config, stop))
            promoted, skews = [first], []
            try:
                await poll(lambda: all(metric(r, 'distillery_serving_streams_total{result="ok"}') for r in replicas),
                           120, "streams finished on both replicas", 0.5)  # fmt: skip
                for source in sources:
                    ckpt = register(registry, source)  # written and promoted, then announced: the trainer's order
                    await asyncio.to_thread(lambda c=ckpt: producer.send(kafka.topic_checkpoints, c.manifest.run_id,
                                                                         event_for(c)).get(timeout=30))  # fmt: skip
                    published = time.perf_counter()
                    at: dict[str, float] = {}

                    async def arrived(c: int = ckpt.version, at: dict[str, float] = at) -> bool:
                        for address in addresses:
                            if address not in at and await version_of(address) == c:
                                at[address] = time.perf_counter()
                        return len(at) == len(addresses)

                    await poll(arrived, 300, f"both replicas on version {ckpt.version}", 0.05)
                    skews.append(max(at.values()) - min(at.values()))
                    print(f"version {ckpt.version}: served {max(at.values()) - published:.2f} s after the "
                          f"announcement, replicas {skews[-1]:.2f} s apart")  # fmt: skip
                    promoted.append(ckpt)
                    await asyncio.sleep(3.0)  # streams on the new version on both replicas before the next one
            finally:
                # Bounded load: the streams open now finish; no new ones start.
                stop.set()
            result = await load
            final = [await version_of(a) for a in addresses]
            swaps_ok = [metric(r, 'distillery_serving_swaps_total{result="ok"}') for r in replicas]
            per_replica = [metric(r, 'distillery_serving_streams_total{result="ok"}') for r in replicas]

            # A replica added (or restarted) now: it serves the newest promoted checkpoint from the registry at
            # once, and its own new consumer group replays the topic from the start, ignoring every event in it.
            async with serving_replicas(1, env, tmp_path / "logs-late") as (late,):
                assert await version_of(late.address) == promoted[-1].version
                ignored = 'distillery_serving_swaps_total{result="ignored"}'
                await poll(lambda: metric(late, ignored) == PROMOTIONS, 120, "the replayed events ignored", 0.5)
                assert metric(late, 'distillery_serving_swaps_total{result="ok"}') == 0
    finally:
        producer.close()

    summary = result.summary()
    # Between two streams a client may meet the other replica while the two are a moment apart on a promotion: a
    # step back to the older version. Reported, not asserted (the replicas swap independently).
    back = 0
    for k in range(config.concurrency):
        seen = [max(s.versions) for s in result.streams if s.client == k and s.versions]
        back += sum(1 for a, b in itertools.pairwise(seen) if b < a)
    print({k: summary[k] for k in ("streams", "completed", "failed", "errors", "tokens_per_s", "versions")},
          "streams per replica", per_replica, "skews", [round(s, 3) for s in skews], "steps back", back)  # fmt: skip
    assert final == [promoted[-1].version] * 2
    assert swaps_ok == [PROMOTIONS] * 2
    assert summary["failed"] == 0, summary["errors"]
    assert summary["versions"] == [c.version for c in promoted], "the load ran through every promotion"
    assert summary["mixed_version_streams"] == 0  # each stream's tokens come from one version: no change at all
    assert all(n > 0 for n in per_replica), per_replica
    assert summary["streams"] == sum(per_replica)  # every stream went to one of the two, and finished there
