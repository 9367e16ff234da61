"""The three real services, running as `distillery <service> serve` processes on tiny models, for deployment tests.

One set per test session: the embedded broker, a tiny random Llama as the teacher and as serving's model, the
trainer made from it. Serving gets a short burst of real client streams, so its words-per-minute histogram holds
observations that Prometheus can be asked about.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.common.process import ProcessGroup, ServiceProcess


@dataclass
class LiveServices:
    processes: dict[str, ServiceProcess]

    def metrics_url(self, service: str) -> str:
        return self.processes[service].metrics_url

    def metrics_target(self, service: str) -> str:
        """host:port as Prometheus scrapes it."""
        return f"127.0.0.1:{self.processes[service].metrics_port}"


@contextlib.contextmanager
def live_services(bootstrap: str, model_dir: Path, home: Path) -> Iterator[LiveServices]:
    common = {
        "DISTILLERY_HOME": str(home),
        "DISTILLERY_KAFKA_BOOTSTRAP": bootstrap,
        "DISTILLERY_KAFKA_PARTITIONS": "1",
    }
    vllm = {"VLLM__ENFORCE_EAGER": "true", "VLLM__KV_CACHE_GIB": "0.25", "VLLM__MAX_MODEL_LEN": "1024"}
    env = {
        "teacher": {"MODEL": str(model_dir), **vllm},
        "trainer": {"TEACHER_MODEL": str(model_dir)},
        "serving": {"INITIAL_MODEL": str(model_dir), "SWAP__STRATEGY": "engine", **vllm},
    }
    group = ProcessGroup()
    try:
        for name, settings in env.items():
            prefix = f"DISTILLERY_{name.upper()}_"
            service_env = {
                **common,
                **{prefix + k: v for k, v in settings.items()},
                f"{prefix}REGISTRY_DIR": str(home / "registry"),
            }
            group.add(ServiceProcess(name, service_env, home / "logs" / f"{name}.log")).start()
        for process in group.processes:
            process.wait_healthy(timeout_s=600)
        yield LiveServices({p.name: p for p in group.processes})
    finally:
        group.stop_all()


def serve_streams(address: str, streams: int = 24, concurrency: int = 4, max_tokens: int = 24) -> list[float]:
    """Real Generate streams against serving; returns their words per minute as the client measured them."""
    from services.serving.loadtest import LoadtestConfig, run_loadtest

    config = LoadtestConfig(
        address=address, concurrency=concurrency, duration_s=None, max_streams=streams, max_tokens=max_tokens,
        temperature=1.0,  # a random tiny model needs sampling to produce words
    )  # fmt: skip
    result = asyncio.run(run_loadtest(config))
    assert all(s.error is None for s in result.streams), [s.error for s in result.streams]
    return [w for s in result.streams if (w := s.wpm(config.min_wpm_tokens)) is not None]
