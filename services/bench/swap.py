"""`distillery bench swap`: hot-swaps under load, measured from the outside.

A serving process (`distillery serving serve`, watching the checkpoints topic) serves the default student from a
private registry while the load generator keeps `concurrency` streams open. After a steady phase, a new checkpoint
of the student (same architecture, perturbed weights) is promoted every `interval_s`: promotion = its
CheckpointEvent acknowledged by the broker; serving = GetModel reports its version. Inter-token latency is compared
between the steady phase and the swap windows (from a promotion until the old version's last stream ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.bench.serving import default_student
from services.common import channels, pb
from services.common.metrics import read_metrics
from services.common.registry import Checkpoint, Registry
from services.common.settings import KafkaSettings, distillery_home
from services.serving.loadtest import LoadtestConfig, LoadtestResult, percentile, run_loadtest
from services.serving.process import free_port, serving_process

logger = logging.getLogger(__name__)


@dataclass
class SwapBenchConfig:
    home: Path
    swaps: int = 6
    interval_s: float = 8.0
    steady_s: float = 15.0
    warmup_s: float = 3.0
    """Load before the steady phase counts (TTFT burst of the first streams)."""
    concurrency: int = 32
    max_tokens: int = 128
    temperature: float = 0.0
    strategy: str = "standby"
    max_num_seqs: int = 256
    kv_cache_gib: float = 1.0
    noise: float = 1e-3
    """Relative size of the perturbation that makes each checkpoint's weights different."""


@contextlib.contextmanager
def bench_kafka(workdir: Path) -> Iterator[KafkaSettings]:
    """The configured or running cluster, else a private embedded broker; fresh topic names either way."""
    from services.common import broker
    from services.common.kafka import NoBroker, resolve_bootstrap

    suffix = uuid.uuid4().hex[:8]
    base = KafkaSettings()
    topics = {"topic_checkpoints": f"bench.{suffix}.checkpoints", "topic_dead_letters": f"bench.{suffix}.dead"}
    try:
        yield base.model_copy(update={"bootstrap": resolve_bootstrap(base), **topics})
    except NoBroker:
        with broker.embedded(workdir / "broker") as state:
            yield base.model_copy(update={"bootstrap": state.bootstrap, **topics})


def perturbed_checkpoints(registry: Registry, student: Path, n: int, noise: float) -> list[Checkpoint]:
    """`n` checkpoints of the student, each with its weights nudged by seeded noise (same architecture)."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(student / "model.safetensors"))
    out = []
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        nudged = {
            name: (t.float() * (1 + noise * torch.randn(t.shape, generator=generator))).to(t.dtype)
            for name, t in weights.items()
        }
        staged = registry.staging_dir()
        for file in student.iterdir():
            if file.name != "model.safetensors" and file.is_file():
                shutil.copy(file, staged / file.name)
        save_file(nudged, str(staged / "model.safetensors"), metadata={"format": "pt"})
        ckpt = registry.write(
            staged, run_id="bench-swap", step=i, parameter_count=sum(t.numel() for t in nudged.values())
        )
        out.append(ckpt)
    return out


def _event(ckpt: Checkpoint) -> pb.common.CheckpointEvent:
    return pb.common.CheckpointEvent(
        run_id=ckpt.manifest.run_id, version=ckpt.version, registry_uri=ckpt.uri,
        manifest_sha256=ckpt.manifest_sha256, parameter_count=ckpt.manifest.parameter_count, promoted=True,
        step=ckpt.manifest.step,
    )  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _publish(producer: Any, topic: str, event: pb.common.CheckpointEvent) -> None:
    producer.send(topic, event.run_id, event).get(30)


async def _wait_standby(metrics_port: int, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        page = await asyncio.to_thread(read_metrics, f"http://127.0.0.1:{metrics_port}/metrics")
        value = page.get('distillery_serving_engines{role="standby"}')
        if value:
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no standby engine after {timeout_s}s")


def _windows(result: LoadtestResult, swaps: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """For each swap: from its promotion until the old version's last token (or the switch, if later)."""
    windows = []
    for swap in swaps:
        old_ends = [
            s.last_token for s in result.streams
            if swap["old_version"] in s.versions and s.last_token is not None and s.last_token > swap["published"]
        ]  # fmt: skip
        windows.append((swap["published"], max([swap["serving"], *old_ends])))
    return windows


async def run_swap_bench(config: SwapBenchConfig) -> dict[str, Any]:
    from services.common.kafka import ProtoProducer, ensure_topics
    from services.common.models import prepare_default_teacher

    started = time.monotonic()
    models_dir = config.home / "models"
    teacher = await asyncio.to_thread(prepare_default_teacher, models_dir)
    student = await asyncio.to_thread(default_student, models_dir, teacher)
    workdir = config.home / "bench" / f"swap-{uuid.uuid4().hex[:8]}"
    registry = Registry(workdir / "registry")
    ckpts = await asyncio.to_thread(perturbed_checkpoints, registry, student, config.swaps + 1, config.noise)
    registry.promote(ckpts[0])
    metrics_port = free_port()
    with bench_kafka(workdir) as kafka:
        await asyncio.to_thread(ensure_topics, kafka, [kafka.topic_checkpoints])
        env = {
            "DISTILLERY_HOME": str(workdir),
            "DISTILLERY_KAFKA_BOOTSTRAP": str(kafka.bootstrap),
            "DISTILLERY_KAFKA_TOPIC_CHECKPOINTS": kafka.topic_checkpoints,
            "DISTILLERY_KAFKA_TOPIC_DEAD_LETTERS": kafka.topic_dead_letters,
            "DISTILLERY_SERVING_SWAP__STRATEGY": config.strategy,
            "DISTILLERY_SERVING_VLLM__MAX_NUM_SEQS": str(config.max_num_seqs),
            "DISTILLERY_SERVING_VLLM__KV_CACHE_GIB": str(config.kv_cache_gib),
            "DISTILLERY_SERVING_VLLM__MAX_MODEL_LEN": "1024",
            "DISTILLERY_SERVING_LOG_LEVEL": "INFO",
        }
        producer = ProtoProducer(kafka, "bench-swap")
        try:
            async with serving_process(env, workdir / "serving.log", metrics_port=metrics_port) as address:
                standby_s = await _wait_standby(metrics_port, 600) if config.strategy == "standby" else 0.0
                result, swaps = await _load_and_swap(config, address, producer, kafka, ckpts)
        finally:
            producer.close()
            shutil.rmtree(workdir / "registry", ignore_errors=True)  # checkpoints are big; the log stays
    windows = _windows(result, swaps)
    load_start = result.started + config.warmup_s
    first_publish = swaps[0]["published"] if swaps else result.finished
    steady = [
        g for s in result.streams for g, t in zip(s.gaps, s.gap_times, strict=True) if load_start <= t < first_publish
    ]
    during = [
        g for s in result.streams for g, t in zip(s.gaps, s.gap_times, strict=True)
        if any(a <= t <= b for a, b in windows)
    ]  # fmt: skip
    ttft_steady = [s.first_token - s.started for s in result.streams
                   if s.first_token is not None and load_start <= s.started < first_publish]  # fmt: skip
    ttft_swap = [s.first_token - s.started for s in result.streams
                 if s.first_token is not None and any(a <= s.started <= b for a, b in windows)]  # fmt: skip
    summary = result.summary()
    p99_steady, p99_swap = percentile(steady, 99), percentile(during, 99)
    promotion = [s["serving"] - s["published"] for s in swaps if s["serving"] is not None]
    return {
        "swaps": sum(1 for s in swaps if s["serving"] is not None),
        "failed_requests": summary["failed"],
        "p99_itl_ms_steady": round(p99_steady * 1000, 2) if p99_steady is not None else None,
        "p99_itl_ms_during_swap": round(p99_swap * 1000, 2) if p99_swap is not None else None,
        "promotion_to_serving_s": round(max(promotion), 3) if promotion else None,
        "promotion_to_serving_s_p50": round(percentile(promotion, 50) or 0, 3) if promotion else None,
        "mixed_version_streams": summary["mixed_version_streams"],
        "p99_ttft_ms_steady": _ms(percentile(ttft_steady, 99)),
        "p99_ttft_ms_during_swap": _ms(percentile(ttft_swap, 99)),
        "itl_samples": {"steady": len(steady), "during_swap": len(during)},
        "swap_windows_s": [round(b - a, 2) for a, b in windows],
        "standby_ready_after_start_s": round(standby_s, 1),
        "load": {
            k: summary[k]
            for k in (
                "concurrency",
                "streams",
                "completed",
                "tokens_per_s",
                "wpm_p50",
                "ttft_ms_p50",
                "itl_ms_p50",
                "itl_ms_p99",
            )
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "cpus": len(os.sched_getaffinity(0)),
        "seconds": round(time.monotonic() - started, 1),
    }


async def _load_and_swap(
    config: SwapBenchConfig, address: str, producer: Any, kafka: KafkaSettings, ckpts: list[Checkpoint]
) -> tuple[LoadtestResult, list[dict[str, Any]]]:
    duration = config.warmup_s + config.steady_s + config.swaps * config.interval_s + config.interval_s
    load = asyncio.create_task(
        run_loadtest(
            LoadtestConfig(
                address=address,
                concurrency=config.concurrency,
                duration_s=duration,
                max_tokens=config.max_tokens,
                temperature=config.temperature,
            )
        )
    )
    swaps: list[dict[str, Any]] = []
    async with channels.aio_channel(address) as channel:
        stub = pb.serving_grpc.ServingServiceStub(channel)
        await asyncio.sleep(config.warmup_s + config.steady_s)
        for previous, ckpt in itertools.pairwise(ckpts):
            tick = time.perf_counter()
            await asyncio.to_thread(_publish, producer, kafka.topic_checkpoints, _event(ckpt))
            published = time.perf_counter()
            serving = None
            while time.perf_counter() - published < 900:
                reply = await stub.GetModel(pb.serving.GetModelRequest())
                if reply.model.version == ckpt.version:
                    serving = time.perf_counter()
                    break
                await asyncio.sleep(0.02)
            swaps.append({"version": ckpt.version, "old_version": previous.version, "published": published,
                          "serving": serving})  # fmt: skip
            logger.info("swap to %d: %s s", ckpt.version, None if serving is None else round(serving - published, 3))
            await asyncio.sleep(max(0.0, config.interval_s - (time.perf_counter() - tick)))
    return await load, swaps


def default_swap_config(**overrides: Any) -> SwapBenchConfig:
    return SwapBenchConfig(home=overrides.pop("home", None) or distillery_home(), **overrides)
