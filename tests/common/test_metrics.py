"""`read_metrics`: a real `/metrics` endpoint read into {name{labels}: value}."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from services.common.metrics import read_metrics
from services.common.process import free_port


def test_read_metrics_keys_samples_by_name_and_sorted_labels() -> None:
    registry = CollectorRegistry()
    Gauge("distillery_serving_engines", "e", ["role"], registry=registry).labels(role="standby").set(1)
    Counter("distillery_things", "t", ["b", "a"], registry=registry).labels(b="2", a="1").inc(3)
    Gauge("distillery_plain", "p", registry=registry).set(2.5)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        page = read_metrics(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        thread.join(5)
    assert page['distillery_serving_engines{role="standby"}'] == 1.0
    assert page['distillery_things_total{a="1",b="2"}'] == 3.0
    assert page["distillery_plain"] == 2.5


def test_read_metrics_raises_when_nothing_listens() -> None:
    with pytest.raises(OSError):
        read_metrics(f"http://127.0.0.1:{free_port()}/metrics", timeout_s=2)
