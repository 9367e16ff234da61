"""`distillery broker check`: conformance checks against a running broker, and kill -9 durability of one it starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from services.common.broker_check import Checker, started_broker
from tests.leftovers import wait_gone


def test_checks_pass_on_the_session_broker_and_durability_needs_a_broker_the_check_started(
    kafka_bootstrap: str,
) -> None:
    results = {r.name: r for r in Checker(kafka_bootstrap).run(["produce-consume", "headers", "restart-durability"])}
    assert results["produce-consume"].status == "pass", results["produce-consume"].reason
    assert results["headers"].status == "pass", results["headers"].reason
    assert results["restart-durability"].status == "skip"


def test_cli_prints_json_and_exits_zero_when_nothing_fails(kafka_bootstrap: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "broker", "check", "--bootstrap", kafka_bootstrap, "--only",
         "idempotent-producer", "--json"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["broker"] == kafka_bootstrap
    assert [(r["name"], r["status"]) for r in report["results"]] == [("idempotent-producer", "pass")]


def test_noida_keeps_settled_records_and_commits_across_kill_9_and_loses_the_last_second() -> None:
    """What the README says of noida-db, measured: nothing lost 2 s after the acks, everything since its last save
    lost right after them (the check fails on that, as it must)."""
    with started_broker("noida") as (bootstrap, restart, _):
        [result] = Checker(bootstrap, restart).run(["restart-durability"])
    assert result.status == "fail"
    assert "kill -9 2 s later: lost 0 of 300 acknowledged records and 0 of 4 commits" in result.reason


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # exited meanwhile (a consumer of another test)
        return ""


@pytest.mark.e2e
def test_tansu_s3_loses_nothing_when_the_broker_or_its_s3_server_is_killed() -> None:
    """What made tansu-s3 the default, measured: 0 acknowledged records and 0 commits lost to a kill -9 of tansu right
    after the acks and 2 s later, and of tansu and SeaweedFS together; the S3 server stops with the broker."""
    with started_broker("tansu-s3") as (bootstrap, restart, restart_store):
        assert restart_store is not None
        [durability] = Checker(bootstrap, restart, restart_store).run(["restart-durability"])
        stores = [p for p in psutil.Process().children() if "distillery-broker-check-" in _cmdline(p)]
        assert [p.name() for p in stores] == ["weed"]
    print(f"\n{durability.reason}")  # the figures (pytest -s)
    assert durability.status == "pass", durability.reason
    lost_nothing = "lost 0 of 300 acknowledged records and 0 of 4 commits"
    assert durability.reason == (
        f"kill -9 right after the acks: {lost_nothing}; kill -9 2 s later: {lost_nothing}; "
        f"kill -9 of the broker and its storage server right after the acks: {lost_nothing}"
    )
    assert wait_gone(stores, timeout_s=10) == []  # the S3 server was stopped with the broker
