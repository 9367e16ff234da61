"""`distillery demo`."""

from __future__ import annotations

from services.common.stub import not_implemented


def demo() -> None:
    """The whole pipeline on embedded defaults, with a report."""
    not_implemented("demo", 6)
