"""Run commands in the built image the way a Kubernetes pod does, with buildah's chroot isolation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path

# vfs works without overlay support or privileges; it is what scripts/image.sh builds into.
STORAGE = ["--storage-driver", os.environ.get("STORAGE_DRIVER", "vfs")]


def buildah() -> str | None:
    return shutil.which("buildah")


def image_config(image: str) -> dict | None:
    """The image's OCI config (Entrypoint, User, Env, ExposedPorts, ...), or None when the image is not built."""
    tool = buildah()
    if tool is None:
        return None
    found = subprocess.run(
        [tool, *STORAGE, "inspect", "--type", "image", image], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        return None
    return json.loads(found.stdout)["OCIv1"]["config"]


def read_env_file(path: Path) -> dict[str, str]:
    """A kustomize `envs:` file (KEY=VALUE lines, # comments) as a dict: what the ConfigMap hands the pod."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and line[0] != "#")
    return {key.strip(): value.strip() for key, value in pairs}


class Container:
    """A working container of the image; `start` runs the image's entrypoint with arguments, like a pod's args."""

    def __init__(self, image: str, volumes: Mapping[Path, str], env: Mapping[str, str], user: str) -> None:
        tool = buildah()
        assert tool is not None
        self.tool = tool
        self.image = image
        self.volumes = volumes
        self.env = env
        self.user = user
        self.name = f"distillery-test-{uuid.uuid4().hex[:8]}"
        subprocess.run([tool, *STORAGE, "from", "--name", self.name, image], check=True, capture_output=True)
        config = image_config(image) or {}
        self.entrypoint: list[str] = config.get("Entrypoint") or []
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, args: list[str], entrypoint: bool = True) -> list[str]:
        cmd = [self.tool, *STORAGE, "run", "--isolation", "chroot", "--user", self.user]
        for host, inside in self.volumes.items():
            cmd += ["-v", f"{host}:{inside}"]
        for key, value in self.env.items():
            cmd += ["-e", f"{key}={value}"]
        return [*cmd, self.name, "--", *(self.entrypoint if entrypoint else []), *args]

    def run(
        self, args: list[str], *, entrypoint: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(args, entrypoint), capture_output=True, text=True, timeout=timeout, check=False
        )

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            # Its own process group: stopping it reaches the service inside, not just buildah.
            self.process = subprocess.Popen(
                self.command(args), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self.process

    def service_pid(self) -> int | None:
        """The container's main process (the entrypoint): chroot isolation has no PID namespace, so it is the first
        descendant of buildah that is not buildah's own."""
        assert self.process is not None
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        queue = [self.process.pid]
        while queue:  # breadth first: the entrypoint before the engine processes it spawns
            pid = queue.pop(0)
            try:
                argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # The first process that is not buildah's own (buildah, its chroot runtime, chroot-exec).
            if pid != self.process.pid and not Path(argv[0].decode()).name.startswith("buildah"):
                return pid
            queue.extend(children.get(pid, []))
        return None

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM to the service, as the kubelet sends it to the container's main process; then SIGKILL to
        everything after `timeout`. Returns buildah's exit status, which is the service's."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        pid = self.service_pid() if self.entrypoint else None
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        else:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(30)

    def remove(self) -> None:
        self.stop()
        subprocess.run([self.tool, *STORAGE, "rm", self.name], capture_output=True, check=False)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
