"""A synthetic exporter for alert-rule tests: streams at a chosen speed (e.g. below 238 wpm, which a healthy
service cannot be made to produce on demand) observed into the real serving metric name and buckets.

The real services, scraped by the metric-name and Prometheus tests, are in `tests/deploy/live.py`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from services.common.settings import READING_TARGET_WPM

#: The serving service's buckets (the contract: around the 238 wpm target).
WPM_BUCKETS = (60, 120, 180, 238, 300, 400, 600, 1000, 2000, 5000)


@dataclass
class ServingTarget:
    address: str
    """host:port Prometheus scrapes (`/metrics`)."""
    median_wpm: float
    """Stream speed the traffic runs at (for the in-test exporter: exactly; for a real service: measured)."""


@contextlib.contextmanager
def serving_traffic(wpm: float = 150.0, streams_per_second: float = 20.0) -> Iterator[ServingTarget]:
    """An exporter whose `distillery_serving_stream_words_per_minute` histogram fills while it runs."""
    registry = CollectorRegistry()
    histogram = Histogram(
        "distillery_serving_stream_words_per_minute",
        "Words per minute of finished streams.",
        buckets=WPM_BUCKETS,
        registry=registry,
    )
    target = Gauge("distillery_reading_target_wpm", "Reading-speed target.", registry=registry)
    target.set(READING_TARGET_WPM)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    stop = threading.Event()

    def streams() -> None:
        while not stop.wait(1.0 / streams_per_second):
            histogram.observe(wpm)

    traffic = threading.Thread(target=streams, name="synthetic-streams", daemon=True)
    traffic.start()
    try:
        yield ServingTarget(address=f"127.0.0.1:{server.server_port}", median_wpm=wpm)
    finally:
        stop.set()
        traffic.join(timeout=5)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def headroom_exporter(value: float) -> Iterator[str]:
    """An exporter of one serving replica's `distillery_serving_wpm_headroom_ratio` (its real name and type), fixed
    at `value`; yields the host:port Prometheus scrapes."""
    registry = CollectorRegistry()
    Gauge("distillery_serving_wpm_headroom_ratio", "Median open-stream speed over the target.", registry=registry).set(
        value
    )
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
