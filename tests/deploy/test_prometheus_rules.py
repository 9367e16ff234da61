"""The alert rules: promtool accepts them, their unit tests pass, and each alert is documented and tested both ways."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import DEPLOY, REPO
from tests.deploy.metrics import SYNTHETIC, contract_sample_names, metric_names

RULES = DEPLOY / "prometheus" / "rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yml"
README = DEPLOY / "README.md"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_rule_unit_tests(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, check=False, cwd=RULE_TESTS.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_required_alerts_exist() -> None:
    names = {a["alert"] for a in alerts()}
    assert names == {
        "DistilleryStreamsBelowReadingSpeed",
        "DistilleryTrainerLagGrowing",
        "DistillerySwapFailed",
        "DistilleryErrorRatioHigh",
        "DistilleryServiceDown",
    }
    by_name = {a["alert"]: a for a in alerts()}
    slow = by_name["DistilleryStreamsBelowReadingSpeed"]
    assert slow["for"] == "5m" and "distillery_reading_target_wpm" in slow["expr"] and "238" not in slow["expr"]
    assert by_name["DistilleryTrainerLagGrowing"]["for"] == "15m"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names <= fires, f"alerts never tested firing: {names - fires}"
    assert names <= quiet, f"alerts never tested quiet: {names - quiet}"


def test_every_alert_is_documented_with_a_runbook_section() -> None:
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", README.read_text(), flags=re.M)}
    for alert in alerts():
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), alert["alert"]
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert (REPO / path).resolve() == README.resolve(), annotations["runbook_url"]
        assert anchor in anchors, f"deploy/README.md has no section #{anchor}"
        assert alert["labels"]["severity"] in {"warning", "critical"}


def test_rules_query_only_exported_metrics() -> None:
    used = set().union(*(metric_names(a["expr"]) for a in alerts()))
    unknown = used - contract_sample_names() - SYNTHETIC
    assert not unknown, f"rules query metrics no service exports: {unknown}"
    assert "distillery_serving_stream_words_per_minute_bucket" in used


def test_generated_prometheusrule_is_fresh() -> None:
    script = DEPLOY / "prometheus" / "prometheusrule.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert result.returncode == 0, result.stderr


def test_generated_prometheusrule_carries_the_same_groups() -> None:
    generated = yaml.safe_load(
        (DEPLOY / "k8s" / "components" / "prometheus-operator" / "prometheusrule.yaml").read_text()
    )
    assert generated["kind"] == "PrometheusRule"
    assert generated["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_runbook_anchor_slugs() -> None:
    assert github_anchor("DistillerySwapFailed") == "distilleryswapfailed"
    assert github_anchor("Point at an existing Kafka") == "point-at-an-existing-kafka"
    assert Path(README).is_file()
