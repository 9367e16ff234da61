"""Runs `distillery serving serve` as a child process for benchmarks: env settings in, address out, SIGTERM to stop.

Benchmarks drive the service through gRPC from another process, as clients would, so the load generator does not
share the service's interpreter (and GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serving_process(
    env: Mapping[str, str], log_path: Path, start_timeout_s: float = 600.0, *, return_process: bool = False
) -> AsyncIterator[Any]:
    """Starts the service with `DISTILLERY_SERVING_*` (and other) variables from `env`; yields its gRPC address
    (and the process, with `return_process`) once health says SERVING; stops it with SIGTERM (then SIGKILL)."""
    port = free_port()
    full_env = {
        **os.environ,
        "DISTILLERY_SERVING_HOST": "127.0.0.1",
        "DISTILLERY_SERVING_GRPC_PORT": str(port),
        "DISTILLERY_SERVING_METRICS_PORT": str(free_port()),
        **env,
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # noqa: ASYNC230 (opening a log file: instant)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "serving", "serve", env=full_env, stdout=log, stderr=log
        )
        address = f"127.0.0.1:{port}"
        try:
            await _wait_serving(proc, address, start_timeout_s, log_path)
            yield (address, proc) if return_process else address
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def _wait_serving(proc: asyncio.subprocess.Process, address: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.returncode is not None:
                tail = log.read_text(errors="replace")[-3000:]  # noqa: ASYNC240 (failure path)
                raise RuntimeError(f"the serving process exited with {proc.returncode}; log {log}:\n{tail}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the serving process at {address} was not SERVING after {timeout_s}s (log {log})")
            await asyncio.sleep(0.5)
