"""`distillery broker check`: conformance checks against a running broker, and kill -9 durability of one it starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from services.common.broker_check import Checker, started_broker


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
