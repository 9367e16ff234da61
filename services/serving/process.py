"""Runs `distillery serving serve` as a child process for benchmarks: env settings in, address out, SIGTERM to stop.

Benchmarks drive the service through gRPC from another process, as clients would, so the load generator does not
share the service's interpreter (and GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from services.common.process import ServiceProcess, free_port
from services.common.security import TlsSettings

__all__ = ["free_port", "serving_process"]


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
