"""Fixtures for the image tests: the built image (skip when it is not), pod-like volumes and settings."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from tests.image.buildah import buildah, image_config, read_env_file

REPO = Path(__file__).resolve().parents[2]
K8S_CONFIG = REPO / "deploy" / "k8s" / "base" / "config"
UID = 10001


def default_image() -> str:
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), flags=re.M)
    assert version
    return os.environ.get("DISTILLERY_IMAGE", f"distillery:{version.group(1)}-cpu")


@pytest.fixture(scope="session")
def image() -> str:
    name = default_image()
    # `make image-test` asks for the image: there a missing one is a failure, elsewhere a skip.
    missing = pytest.fail if os.environ.get("DISTILLERY_REQUIRE_IMAGE") == "1" else pytest.skip
    if buildah() is None:
        missing("buildah is not installed: `make image` installs it (Debian) or says how")
    if image_config(name) is None:
        missing(f"image {name} is not built: run `make image`")
    return name


@pytest.fixture
def pod_volumes(tmp_path: Path) -> dict[Path, str]:
    """The Deployments' emptyDir/PVC mounts, as host folders owned by the pod's uid."""
    volumes = {}
    for inside in ("/tmp", "/var/cache/distillery", "/var/lib/distillery", "/registry"):
        host = tmp_path / inside.strip("/").replace("/", "-")
        host.mkdir()
        os.chown(host, UID, UID)
        volumes[host] = inside
    return volumes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pod_env(service: str, kafka_bootstrap: str) -> dict[str, str]:
    """What the base kustomization hands the service's pod (its ConfigMaps), with this sandbox's differences:
    the container shares the host network here (not a pod's own), so it binds 127.0.0.1 on free ports, and the
    test broker has one node."""
    env: dict[str, str] = {}
    for name in ("kafka", "security", service):
        env.update(read_env_file(K8S_CONFIG / f"{name}.env"))
    prefix = f"DISTILLERY_{service.upper()}_"
    env.update(
        {
            prefix + "HOST": "127.0.0.1",
            prefix + "GRPC_PORT": str(free_port()),
            prefix + "METRICS_PORT": str(free_port()),
            "DISTILLERY_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "DISTILLERY_KAFKA_REPLICATION_FACTOR": "1",
            "DISTILLERY_KAFKA_PARTITIONS": "1",
        }
    )
    return env
