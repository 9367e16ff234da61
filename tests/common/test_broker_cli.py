"""`distillery broker start|status|stop` manage the broker (and tansu-s3's S3 server) by recorded PIDs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services.common import s3store
from services.common.broker import state_dir, status
from services.common.kafka import ensure_topics
from services.common.settings import KafkaSettings


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISTILLERY_HOME": str(home)}
    env.pop("DISTILLERY_KAFKA_BOOTSTRAP", None)
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_start_status_stop(tmp_path: Path) -> None:
    started = _cli("broker", "start", home=tmp_path)
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout.strip().splitlines()[-1])
    store = s3store.status(state_dir(tmp_path))  # tansu-s3 (the default engine): its S3 server
    try:
        again = _cli("broker", "start", home=tmp_path)  # idempotent: same broker
        assert json.loads(again.stdout.strip().splitlines()[-1]) == info
        assert status(tmp_path).pid == info["pid"]
        # It is a real Kafka-protocol broker.
        created = ensure_topics(KafkaSettings(bootstrap=info["bootstrap"]))
        assert "distillery.prompts.v1" in created
        listed = _cli("broker", "status", home=tmp_path)
        assert listed.returncode == 0 and json.loads(listed.stdout)["pid"] == info["pid"]
    finally:
        stopped = _cli("broker", "stop", home=tmp_path)
    assert stopped.returncode == 0
    assert status(tmp_path) is None
    assert not Path(f"/proc/{info['pid']}/cmdline").exists() or not Path(f"/proc/{info['pid']}/cmdline").read_bytes()
    assert _cli("broker", "status", home=tmp_path).returncode == 1
    if store is not None:
        assert s3store.status(state_dir(tmp_path)) is None
        assert not Path(f"/proc/{store.pid}/cmdline").exists() or not Path(f"/proc/{store.pid}/cmdline").read_bytes()


def test_no_bootstrap_and_no_broker_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    import pytest

    from services.common.kafka import NoBroker, resolve_bootstrap

    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path))
    with pytest.raises(NoBroker, match="DISTILLERY_KAFKA_BOOTSTRAP"):
        resolve_bootstrap(KafkaSettings(bootstrap=None))
    monkeypatch.setenv("DISTILLERY_KAFKA_BOOTSTRAP", "kafka.example:9092")
    assert resolve_bootstrap(KafkaSettings()) == "kafka.example:9092"


def test_free_ports_are_below_the_ephemeral_range() -> None:
    """A port the kernel hands out for port 0 can be handed out again before the child service binds it."""
    from services.common.process import _ephemeral_low, free_port

    ports = {free_port() for _ in range(20)}
    assert all(20000 <= p < _ephemeral_low() for p in ports)
    assert len(ports) > 1
