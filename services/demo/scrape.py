"""Reads a service's `/metrics` for the demo's progress bars and report; an unreachable endpoint reads as empty."""

from __future__ import annotations

from services.common.metrics import read_metrics


def scrape(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    """`read_metrics`, or `{}` when the endpoint is unreachable (a service stopping, or not yet started)."""
    try:
        return read_metrics(url, timeout_s)
    except OSError:
        return {}
