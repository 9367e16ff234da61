"""Runs `distillery serving serve` as a child process for benchmarks: env settings in, address out, SIGTERM to stop.

Benchmarks drive the service through gRPC from another process, as clients would, so the load generator does not
share the service's interpreter (and GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.common.process import ProcessGroup, ServiceProcess, free_port
from services.common.security import TlsSettings

__all__ = ["free_port", "serving_process", "serving_replicas", "target_of"]


@contextlib.asynccontextmanager
async def serving_process(
    env: Mapping[str, str],
    log_path: Path,
    start_timeout_s: float = 600.0,
    metrics_port: int | None = None,
    *,
    return_process: bool = False,
    client_tls: TlsSettings | None = None,
) -> AsyncIterator[Any]:
    """Starts the service with `DISTILLERY_SERVING_*` (and other) variables from `env`; yields its gRPC address
    (and the `ServiceProcess`, with `return_process`) once health says SERVING; stops it with SIGTERM (then SIGKILL
    to its process group). `client_tls`: how the readiness check reaches a TLS service (default: the environment)."""
    proc = ServiceProcess(
        "serving", dict(env), log_path, metrics_port=metrics_port or free_port(), client_tls=client_tls
    )
    proc.start()
    try:
        await asyncio.to_thread(proc.wait_healthy, start_timeout_s)
        yield (proc.address, proc) if return_process else proc.address
    finally:
        await asyncio.to_thread(proc.stop)


@contextlib.asynccontextmanager
async def serving_replicas(
    n: int, env: Mapping[str, str] | Sequence[Mapping[str, str]], log_dir: Path, start_timeout_s: float = 600.0
) -> AsyncIterator[list[ServiceProcess]]:
    """`n` serving processes with the same settings (registry, broker, topics): replicas, as a Deployment runs them.
    `env`: the settings of all of them, or one mapping per replica (e.g. cores of their own). All start at once
    (their engine starts overlap) and are yielded once every one is SERVING; all are stopped at the end, also when
    one fails to start."""
    envs = [env] * n if isinstance(env, Mapping) else list(env)
    if len(envs) != n:
        raise ValueError(f"{len(envs)} environments for {n} replicas")
    group = ProcessGroup()
    try:
        for i, replica_env in enumerate(envs):
            group.add(ServiceProcess("serving", dict(replica_env), log_dir / f"serving-{i}.log")).start()
        await asyncio.gather(*(asyncio.to_thread(p.wait_healthy, start_timeout_s) for p in group.processes))
        yield list(group.processes)
    finally:
        await asyncio.to_thread(group.stop_all)


def target_of(replicas: list[ServiceProcess]) -> str:
    """One gRPC target naming every replica (as `dns:///` names a headless Service's pods): with the `round_robin`
    policy a channel to it spreads calls over all of them."""
    return "ipv4:" + ",".join(p.address for p in replicas)
