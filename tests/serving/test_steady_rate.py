"""`loadtest.steady_rate`: tokens/s from the moment every stream of the first wave is generating, so that a slow
model's start-up ramp (every stream queued for its prefill) does not count against it in a short probe."""

from __future__ import annotations

from services.serving.loadtest import StreamRecord, steady_rate


def stream(started: float, arrivals: list[float]) -> StreamRecord:
    record = StreamRecord(started=started, first_token=arrivals[0] if arrivals else None)
    record.gap_times = arrivals[1:]
    record.tokens = len(arrivals)
    return record


def test_the_ramp_before_the_first_wave_generates_is_left_out() -> None:
    # Two slots: the first wave's streams get their first tokens at 1.0 s and 3.0 s (a queued prefill), then each
    # slot makes 10 tokens/s; the second stream of slot 0 starts later and does not move the start.
    slot0 = stream(0.0, [1.0 + i / 10 for i in range(40)])  # 1.0 … 4.9
    slot1 = stream(0.0, [3.0 + i / 10 for i in range(30)])  # 3.0 … 5.9
    later = stream(5.0, [5.5 + i / 10 for i in range(5)])  # 5.5 … 5.9 (opened after the first wave)
    rate, since = steady_rate([slot0, slot1, later], concurrency=2, finished=6.0)  # type: ignore[misc]
    assert since == 3.0
    # From 3.0: slot0 20 tokens (3.0 … 4.9), slot1 30, the later stream 5, over 3 s.
    assert abs(rate - 55 / 3.0) < 1e-9
    whole = (40 + 30 + 5) / 6.0
    assert rate > whole  # the ramp had pulled the whole probe's figure down


def test_no_steady_state_without_every_first_token_or_a_second_of_it() -> None:
    assert steady_rate([stream(0.0, [1.0]), stream(0.0, [])], concurrency=2, finished=9.0) is None
    assert steady_rate([stream(0.0, [5.5, 5.6])], concurrency=1, finished=6.0) is None
    assert steady_rate([], concurrency=4, finished=1.0) is None
