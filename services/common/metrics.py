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
