"""A process serving gRPC starts children safely: gRPC's fork handlers would abort a child forked with a
`preexec_fn` before it execs (grpc/grpc#43055), which is how a service or the demo starts its children."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

#: Serves health checks to itself from a thread, and starts `/bin/true` with a preexec_fn, as ProcessGroup does.
SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, threading
    from concurrent import futures
    import services  # first, as every distillery entry point
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()

    def traffic():
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        while not stop.is_set():
            stub.Check(health_pb2.HealthCheckRequest())

    threading.Thread(target=traffic, daemon=True).start()
    codes = [subprocess.run(["/bin/true"], preexec_fn=lambda: None).returncode for _ in range(200)]
    stop.set()
    print(sum(1 for c in codes if c != 0))
    """
)


def test_children_started_while_grpc_is_busy_all_exec() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "0", proc.stderr[-3000:]
