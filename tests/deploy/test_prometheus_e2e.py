"""A real Prometheus (Debian's package) scrapes a target exporting the serving stream-speed histogram, answers
the p50 words-per-minute query through its HTTP API, and evaluates the alert rules on what it scraped.

The target comes from `tests/deploy/exporters.serving_traffic`: today an in-test exporter that observes
synthetic stream speeds into the real metric name and buckets, not the serving service itself; that hook is
where the running serving service plugs in.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.conftest import DEPLOY
from tests.deploy.exporters import WPM_BUCKETS, ServingTarget, serving_traffic
from tests.deploy.prometheus_server import PrometheusServer

pytestmark = pytest.mark.e2e

P50 = "histogram_quantile(0.5, sum by (le) (rate(distillery_serving_stream_words_per_minute_bucket[30s])))"


@pytest.fixture(scope="module")
def serving_target() -> Iterator[ServingTarget]:
    """Hook: something serving streams at a known speed, exporting distillery_serving_* on /metrics."""
    with serving_traffic(wpm=150.0) as target:
        yield target


@pytest.fixture(scope="module")
def prometheus(
    prometheus_bin: str, serving_target: ServingTarget, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    rules = DEPLOY / "prometheus" / "rules.yml"
    workdir = tmp_path_factory.mktemp("prometheus")
    with PrometheusServer(
        prometheus_bin, workdir, jobs={"serving": [serving_target.address]}, rule_files=[rules]
    ) as server:
        yield server


def bucket_bounds(value: float) -> tuple[float, float]:
    """The histogram bucket a value falls in: the quantile Prometheus interpolates lies within it."""
    lower = 0.0
    for upper in WPM_BUCKETS:
        if value <= upper:
            return lower, float(upper)
        lower = float(upper)
    return lower, float("inf")


def test_prometheus_reads_the_wpm_quantile_back(prometheus: PrometheusServer, serving_target: ServingTarget) -> None:
    up = prometheus.wait_for(lambda: prometheus.query('up{job="serving"}'), lambda r: bool(r), timeout=30)
    assert up[0]["value"][1] == "1", up
    result = prometheus.wait_for(
        lambda: prometheus.query(P50), lambda r: bool(r) and r[0]["value"][1] not in ("NaN", "+Inf"), timeout=60
    )
    p50 = float(result[0]["value"][1])
    lower, upper = bucket_bounds(serving_target.median_wpm)
    assert lower <= p50 <= upper, f"p50 {p50} wpm outside the bucket of {serving_target.median_wpm} wpm"
    target = prometheus.query("max(distillery_reading_target_wpm)")
    assert float(target[0]["value"][1]) == 238.0


def test_prometheus_evaluates_the_slow_stream_alert(
    prometheus: PrometheusServer, serving_target: ServingTarget
) -> None:
    """Streams at 150 wpm are below the 238 target: the rule matches at once and waits out its `for: 5m`."""
    assert serving_target.median_wpm < 238
    alerts = prometheus.wait_for(
        prometheus.alerts,
        lambda alerts: any(a["labels"]["alertname"] == "DistilleryStreamsBelowReadingSpeed" for a in alerts),
        timeout=60,
    )
    (slow,) = [a for a in alerts if a["labels"]["alertname"] == "DistilleryStreamsBelowReadingSpeed"]
    assert slow["state"] == "pending"
    assert slow["labels"]["job"] == "serving" and slow["labels"]["severity"] == "warning"
    assert slow["annotations"]["runbook_url"].endswith("#distillerystreamsbelowreadingspeed")
    lower, upper = bucket_bounds(serving_target.median_wpm)
    assert lower <= float(slow["value"]) <= upper
    assert not [a for a in alerts if a["labels"]["alertname"] == "DistilleryServiceDown"]
