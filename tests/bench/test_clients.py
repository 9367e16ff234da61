"""The benchmark's process helpers: concurrency split over client processes, results merged."""

from __future__ import annotations

from services.bench.clients import merge, split
from services.serving.loadtest import LoadtestConfig, LoadtestResult, StreamRecord


def test_concurrency_is_split_evenly_without_empty_shares() -> None:
    assert split(10, 3) == [4, 3, 3]
    assert split(2, 4) == [1, 1]
    assert split(1, 1) == [1]
    assert sum(split(257, 4)) == 257


def test_merged_results_span_every_process_and_keep_every_stream() -> None:
    config = LoadtestConfig(address="127.0.0.1:1", concurrency=3)
    a = LoadtestResult(config, 10.0, 20.0, [StreamRecord(started=10.0, tokens=5)], [])
    b = LoadtestResult(config, 9.5, 21.0, [StreamRecord(started=9.5, tokens=7), StreamRecord(started=11, tokens=1)], [])
    merged = merge(config, [a, b])
    assert (merged.started, merged.finished) == (9.5, 21.0)
    assert merged.summary()["tokens"] == 13 and merged.summary()["duration_s"] == 11.5
