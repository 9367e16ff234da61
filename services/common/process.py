"""`distillery <service> serve` as a child process (demo, benchmarks): spawn, wait for SERVING, stop by PID.

Each process leads its own process group, so stopping it can also reach the vLLM engine processes it started: SIGTERM
first (the service drains gracefully), SIGKILL to its process group after a grace period. Nothing else is signalled.
A child gets SIGKILL when its starter dies (PR_SET_PDEATHSIG), so a killed demo or benchmark leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import channels
from services.common.security import TlsSettings


class ServiceFailed(RuntimeError):
    """A service process exited or did not become healthy; the message points at its log."""


#: Where `free_port` looks when the kernel's ephemeral range cannot be read (Linux's default range starts at 32768).
FALLBACK_EPHEMERAL_LOW = 32768


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return FALLBACK_EPHEMERAL_LOW


def free_port(low: int = 20000) -> int:
    """A port on 127.0.0.1 that is free now, for a child service to bind later.

    Chosen below the kernel's ephemeral range: a port the kernel hands out for port 0 can be handed out again to
    any process before the child binds it — vLLM's engine picks its internal ports that way during the minutes a
    service's engine takes to start, and a teacher once failed to bind its gRPC port because of it. Ports below the
    range are only ever taken by an explicit bind."""
    high = max(low + 1000, _ephemeral_low())
    candidates = random.sample(range(low, high), k=min(200, high - low))
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # every candidate taken: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux
        return None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Asks Linux to send `sig` to this process when its parent (the thread that forked it) dies, also by kill -9.
    Returns False where prctl is unavailable (not Linux)."""
    prctl = _prctl()
    return prctl is not None and int(prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `sig` when the process that started it dies.

    Popen must be called from a thread that lives as long as the child should (Linux ties the signal to the forking
    thread); our callers start children from their main thread. prctl is looked up here, before the fork, so the
    child only makes the call."""
    parent = os.getpid()
    prctl = _prctl()

    def _preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return _preexec


def exit_when_parent_dies(
    parent: int | None = None, poll_s: float = 0.5, sig: int = signal.SIGKILL
) -> threading.Thread:
    """A daemon thread that sends `sig` to this process once `parent` (default: the current parent) is no longer its
    parent: it died and this process was re-parented to init or a subreaper. For processes started by threads that
    may end before them, where PR_SET_PDEATHSIG would fire too early (it follows the forking thread, not the
    process). Pass the starter's PID when it may have died before this call."""
    expected = os.getppid() if parent is None else parent

    def _watch() -> None:
        while os.getppid() == expected:
            time.sleep(poll_s)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=_watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def install_sigterm_as_interrupt() -> None:
    """SIGTERM (what `timeout` and `kill` send) stops a command the way Ctrl-C does: as a KeyboardInterrupt, so the
    `finally` blocks stop every process it started."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def terminate_recorded(pid: int, alive: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Stops a process this project started and recorded by PID: SIGTERM, up to `timeout_s` for it to end, then
    SIGKILL; reaps it when it is our child. `alive` says whether the PID still runs our program (PIDs get reused)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    if alive():
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Points file descriptor 1 at stderr while the block runs (vLLM and its engine processes log to stdout), so a
    command's stdout carries only the result it prints afterwards (`--json`)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class ServiceProcess:
    """One `distillery <name> serve` process with its ports and log file."""

    name: str
    env: dict[str, str]
    log_path: Path
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    #: Scheduling niceness (0-19) for the process and the engine processes it starts: lets co-located services yield
    #: the CPU to one that matters more.
    nice: int = 0
    #: TLS of the readiness check; None: from `DISTILLERY_TLS_*`, as the child reads its own.
    client_tls: TlsSettings | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        prefix = f"DISTILLERY_{self.name.upper()}_"
        env = {
            **os.environ,
            f"{prefix}HOST": "127.0.0.1",
            f"{prefix}GRPC_PORT": str(self.grpc_port),
            f"{prefix}METRICS_PORT": str(self.metrics_port),
            **self.env,
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            command = [sys.executable, "-m", "services.cli", self.name, "serve"]
            if self.nice:
                command = ["nice", "-n", str(self.nice), *command]
            self.proc = subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own process group (Ctrl-C in the terminal reaches the demo, which stops us in order) but the
                # caller's session: Linux schedules sessions as autogroups, between which `nice` does nothing.
                process_group=0,
                # And it dies with the demo or benchmark that started it, also when that is killed with SIGKILL.
                preexec_fn=die_with_parent(),
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServiceFailed(
                f"{self.name} exited with code {self.proc.returncode}; last lines of {self.log_path}:\n"
                f"{tail(self.log_path)}"
            )

    def wait_healthy(self, timeout_s: float) -> None:
        """Polls grpc.health.v1 until SERVING; fails early when the process dies."""
        deadline = time.monotonic() + timeout_s
        with channels.channel(self.address, tls=self.client_tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self.check_alive()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise ServiceFailed(
                        f"{self.name} was not SERVING within {timeout_s:.0f}s; last lines of {self.log_path}:\n"
                        f"{tail(self.log_path)}"
                    )
                time.sleep(0.25)

    def stop(self, grace_s: float = 60.0) -> int | None:
        """SIGTERM (the service drains), then SIGKILL to its whole process group (vLLM engine children included)
        after `grace_s`; returns the exit code. Only this process and the children it started are signalled."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        # The service leads its own process group: engine processes it spawned are in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class ProcessGroup:
    """The services of one demo run; stops them in reverse start order."""

    processes: list[ServiceProcess] = field(default_factory=list)

    def add(self, process: ServiceProcess) -> ServiceProcess:
        self.processes.append(process)
        return process

    def check_alive(self) -> None:
        for process in self.processes:
            process.check_alive()

    def stop_all(self) -> dict[str, int | None]:
        """Stops every process (never raises: this runs in `finally` blocks); returns the exit codes."""
        codes: dict[str, int | None] = {}
        for process in reversed(self.processes):
            try:
                codes[process.name] = process.stop()
            except Exception as exc:  # keep stopping the others
                codes[process.name] = None
                print(f"could not stop {process.name}: {exc}", file=sys.stderr)
        return codes
