"""Prometheus metrics every service exports, and the `/metrics` HTTP endpoint.

Names follow Prometheus conventions: the `distillery_` prefix, units in names, `_total` counters, labels
with a small fixed set of values.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Info, start_http_server

from services.common.settings import READING_TARGET_WPM

GRPC_REQUESTS = Counter(
    "distillery_grpc_requests_total",
    "gRPC requests handled, by service, method and status code.",
    ["service", "method", "code"],
)
DEAD_LETTERS = Counter(
    "distillery_dead_letters_total",
    "Records sent to the dead-letter topic, by source topic.",
    ["topic"],
)
READING_TARGET = Gauge(
    "distillery_reading_target_wpm",
    "Reading-speed target every served stream must stay ahead of, in words per minute (Brysbaert 2019).",
)
READING_TARGET.set(READING_TARGET_WPM)
BUILD = Info("distillery_build", "Service name and package version.")


def start_metrics_server(host: str, port: int, service: str) -> int:
    """Serves `/metrics` on a daemon thread; returns the bound port (useful when `port` is 0)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("distillery")
    except PackageNotFoundError:
        pkg_version = "dev"
    BUILD.info({"service": service, "version": pkg_version})
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


def read_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """A `/metrics` page as `{"distillery_x_total": 3.0, 'distillery_y_total{result="ok"}': 1.0, ...}` (labels
    sorted by name); raises `OSError` when the endpoint cannot be read."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out
