"""Metric-name plumbing: PromQL extraction, exposition parsing, scraping, and the services' declared metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest, start_http_server

from tests.deploy.metrics import CONTRACT, exported_sample_names, metric_names, parse_exposition, sample_names
from tests.deploy.test_autoscaling import component_query
from tests.deploy.test_dashboard import dashboard_exprs
from tests.deploy.test_prometheus_rules import alerts


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('up{job=~"teacher|serving"} == 0', {"up"}),
        (
            'histogram_quantile(0.5, sum by (namespace, job, le) (rate(x_bucket{a="b"}[5m])))'
            " < on (namespace, job) max by (namespace, job) (target_wpm)",
            {"x_bucket", "target_wpm"},
        ),
        ('sum by (result) (increase(swaps_total{namespace=~"$namespace"}[$__rate_interval]))', {"swaps_total"}),
        ("a_total offset 10m unless b_total @ end()", {"a_total", "b_total"}),
        ("deriv(lag[5m:1m]) > 0 and bool 1e3", {"lag"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ("sum without (instance) (rate(c_total[${__interval}])) / ignoring (code) group_left (x) d", {"c_total", "d"}),
        ("avg(sum by (instance) (rate(t:recorded:rate5m[1m]))) * 60", {"t:recorded:rate5m"}),
        ("vector(1) + time()", set()),
    ],
)
def test_metric_names_in_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exposition_names_include_declared_families_without_samples() -> None:
    registry = CollectorRegistry()
    Counter("demo_requests_total", "labelled, never used", ["code"], registry=registry)
    Histogram("demo_latency_seconds", "h", buckets=(1.0,), registry=registry).observe(0.5)
    Gauge("demo_ratio", "g", registry=registry).set(0.5)
    Info("demo_model", "i", registry=registry).info({"version": "3"})
    names = parse_exposition(generate_latest(registry).decode())
    assert {"demo_requests_total", "demo_latency_seconds_bucket", "demo_latency_seconds_count"} <= names
    assert {"demo_latency_seconds_sum", "demo_ratio", "demo_model_info"} <= names
    assert sample_names("x", "counter") == {"x_total", "x_created"}


def test_exported_sample_names_scrapes_a_real_endpoint() -> None:
    registry = CollectorRegistry()
    Gauge("demo_scraped_ratio", "g", registry=registry).set(1)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        assert "demo_scraped_ratio" in exported_sample_names(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def queried_names() -> set[str]:
    """Metrics the dashboard, the alerts and the serving autoscaler's trigger query."""
    return set().union(
        *(metric_names(e) for e in dashboard_exprs()),
        *(metric_names(a["expr"]) for a in alerts()),
        metric_names(component_query()),
    )


@pytest.mark.e2e
@pytest.mark.parametrize("service", ["teacher", "trainer", "serving"])
def test_queried_metrics_are_exported_by_the_service(service: str, live) -> None:
    """Every metric of `service` the dashboard, the alerts or the autoscaler query is in what the service exports."""
    wanted = {n for n in queried_names() if n.startswith(f"distillery_{service}_")}
    assert wanted, f"nothing queries {service}'s metrics"
    exported = exported_sample_names(live.metrics_url(service))
    shared = {
        n for n in queried_names() if n.startswith(("distillery_grpc_", "distillery_reading_", "distillery_dead_"))
    }
    assert not (wanted - exported), f"queried but not exported by {service}: {sorted(wanted - exported)}"
    assert not (shared - exported), f"shared metrics missing from {service}'s endpoint: {sorted(shared - exported)}"


def test_contract_families_have_the_distillery_prefix_and_units() -> None:
    for name, kind in CONTRACT.items():
        assert name.startswith("distillery_") and ":" not in name
        assert not name.endswith("_total"), f"{name}: counters are listed without _total"
        if kind == "histogram":
            assert name.endswith(("_seconds", "_per_minute")), name
