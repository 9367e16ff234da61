"""Things that export distillery metrics for the deployment tests to scrape.

Two hooks live here, to be pointed at the real services as they land:

- `service_metrics_endpoint(service)`: a `/metrics` URL that exports what `service` declares. Today it imports
  `services/<service>/metrics.py` in a child process beside the shared metrics and serves them on 127.0.0.1;
  switch it to a running `distillery <service> serve` once each service can start in a test.
- `serving_traffic()`: a scrape target exporting `distillery_serving_stream_words_per_minute` while streams are
  being served. Today it is an in-test exporter that observes synthetic stream speeds into the real metric name
  and buckets; NOT the serving service. The lead points it at a running serving service under load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from services.common.settings import READING_TARGET_WPM
from tests.deploy.conftest import REPO

#: The serving service's buckets (the contract: around the 238 wpm target).
WPM_BUCKETS = (60, 120, 180, 238, 300, 400, 600, 1000, 2000, 5000)


@contextlib.contextmanager
def service_metrics_endpoint(service: str) -> Iterator[str]:
    """URL of a `/metrics` endpoint exporting `service`'s declared metrics and the shared ones."""
    if importlib.util.find_spec(f"services.{service}.metrics") is None:
        pytest.skip(f"services/{service}/metrics.py does not exist yet")
    code = textwrap.dedent(
        f"""
        import importlib, sys
        from services.common.metrics import start_metrics_server
        importlib.import_module("services.{service}.metrics")
        print(start_metrics_server("127.0.0.1", 0, "{service}"), flush=True)
        sys.stdin.read()  # serve until the test closes our stdin
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip().isdigit(), f"services.{service}.metrics did not start (exit {process.wait(30)})"
        yield f"http://127.0.0.1:{int(line)}/metrics"
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


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
