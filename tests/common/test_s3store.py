"""tansu-s3's S3 server: its keys stay out of command lines and logs, and a broker whose S3 server died starts again
with a new one on the same data, every acknowledged record still there."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest

from services.common import broker, s3store
from services.common.broker_check import Checker


@pytest.mark.e2e
def test_keys_stay_private_and_a_dead_s3_server_is_restarted_with_the_broker(tmp_path: Path) -> None:
    state = broker.start(tmp_path, engine="tansu-s3", die_with_caller=True)
    folder = broker.state_dir(tmp_path)
    try:
        store = s3store.status(folder)
        assert store is not None
        identities = Path(store.data_dir) / "identities.json"
        assert stat.S_IMODE(identities.stat().st_mode) == 0o600
        secret = json.loads(identities.read_text())["identities"][0]["credentials"][0]["secretKey"]
        for pid in (state.pid, store.pid):
            assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        checker = Checker(state.bootstrap)
        topic = checker.topic("s3-restart")
        acked = checker.produce(topic, 40)

        os.kill(store.pid, signal.SIGKILL)  # only the S3 server: tansu keeps running without its storage
        os.waitpid(store.pid, 0)
        again = broker.start(tmp_path, engine="tansu-s3", die_with_caller=True)
        new_store = s3store.status(folder)
        assert new_store is not None and new_store.pid != store.pid
        assert again.pid != state.pid  # tansu was restarted with it...
        assert new_store.ports == store.ports and again.port == state.port  # ...on the same ports
        checker.bootstrap = again.bootstrap
        assert checker.read_all(topic, len(acked)) == acked
        logs = "".join(p.read_text(errors="replace") for p in folder.glob("*.log"))
        assert secret not in logs
    finally:
        broker.stop(tmp_path)
    assert s3store.status(folder) is None
