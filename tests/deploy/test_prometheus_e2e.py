"""A real Prometheus (Debian's package) scrapes the stream-speed histogram, answers the p50 words-per-minute query
through its HTTP API, and evaluates the alert rules on what it scraped.

`test_prometheus_reads_the_served_wpm_quantile_back` scrapes the real serving service (tests/deploy/live.py) after
real client streams. The alert tests use a synthetic exporter (tests/deploy/exporters.py) whose streams run at a
chosen speed below 238 wpm, which a healthy service cannot be made to produce on demand.
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


def _quantile_from_buckets(q: float, buckets: list[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile over cumulative (upper bound, count) pairs: linear within the bucket."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def test_prometheus_reads_the_served_wpm_quantile_back(live, prometheus_bin: str, tmp_path) -> None:
    """The real serving service streams answers; a real Prometheus scrapes it; its p50 equals the service's own."""
    from services.demo.scrape import scrape
    from tests.deploy.live import serve_streams

    wpms = serve_streams(live.processes["serving"].address)
    assert wpms, "no stream produced a words-per-minute figure"
    raw = scrape(live.metrics_url("serving"))
    buckets = [
        (float(key.split('le="')[1].split('"')[0]), value)
        for key, value in raw.items()
        if key.startswith("distillery_serving_stream_words_per_minute_bucket")
    ]
    observed = raw["distillery_serving_stream_words_per_minute_count"]
    assert observed > 0
    expected_p50 = _quantile_from_buckets(0.5, buckets)

    with PrometheusServer(prometheus_bin, tmp_path, jobs={"serving": [live.metrics_target("serving")]}) as prom:
        count = prom.wait_for(
            lambda: prom.query('sum(distillery_serving_stream_words_per_minute_count{job="serving"})'),
            lambda r: bool(r) and float(r[0]["value"][1]) == observed,
            timeout=60,
        )
        assert float(count[0]["value"][1]) == observed
        p50 = prom.query(
            'histogram_quantile(0.5, sum by (le) (distillery_serving_stream_words_per_minute_bucket{job="serving"}))'
        )
        assert abs(float(p50[0]["value"][1]) - expected_p50) < 1e-6 * max(1.0, expected_p50)
        target = prom.query('max(distillery_reading_target_wpm{job="serving"})')
        assert float(target[0]["value"][1]) == 238.0
