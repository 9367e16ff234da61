"""`loadtest.steady_rate`: tokens/s from the end of the first wave of streams, which all start at once: before it a
slow model first queues every prefill (no tokens) and then decodes with no prefill between (too many)."""

from __future__ import annotations

from services.serving.loadtest import StreamRecord, steady_rate


def stream(started: float, arrivals: list[float], cut: bool = False) -> StreamRecord:
    record = StreamRecord(started=started, first_token=arrivals[0] if arrivals else None)
    record.last_token = arrivals[-1] if arrivals else None
    record.gap_times = arrivals[1:]
    record.tokens = len(arrivals)
    record.cut = cut
    return record


def test_the_window_starts_when_the_first_wave_has_ended() -> None:
    # Two slots. The first wave: first tokens at 1.0 s and 3.0 s (queued prefills), 10 tokens/s each, ending at
    # 2.9 s and 4.9 s; each slot's next stream starts when its last one ended.
    wave = [stream(0.0, [1.0 + i / 10 for i in range(20)]), stream(0.0, [3.0 + i / 10 for i in range(20)])]
    second = [stream(2.9, [3.2 + i / 10 for i in range(20)]), stream(4.9, [5.2 + i / 10 for i in range(20)], True)]
    rate, since = steady_rate(wave + second, concurrency=2, finished=7.1)  # type: ignore[misc]
    assert since == 4.9
    # After 4.9 s: slot 0's second stream's last 2 tokens (5.0, 5.1) and all 20 of slot 1's (5.2 … 7.1), over 2.2 s.
    assert abs(rate - 22 / 2.2) < 1e-9


def test_no_steady_state_when_the_first_wave_did_not_end_or_no_second_is_left() -> None:
    assert steady_rate([stream(0.0, [1.0]), stream(0.0, [])], concurrency=2, finished=9.0) is None
    assert steady_rate([stream(0.0, [1.0, 2.0], cut=True)], concurrency=1, finished=9.0) is None
    assert steady_rate([stream(0.0, [5.5, 5.6])], concurrency=1, finished=6.0) is None
    assert steady_rate([], concurrency=4, finished=1.0) is None


def test_a_records_arrivals_count_gaps_as_the_load_generator_reports_them() -> None:
    record = StreamRecord(started=0.0)
    record.arrived(0, 0.5)  # a message without tokens changes nothing
    record.arrived(2, 1.0)  # the first token is no gap; the second, in the same message, a gap of 0
    record.arrived(3, 1.3)  # three tokens after 0.3 s: three gaps of 0.1 s
    assert (record.first_token, record.last_token, record.tokens) == (1.0, 1.3, 5)
    assert record.gap_times == [1.0, 1.3, 1.3, 1.3]
    assert [round(g, 9) for g in record.gaps] == [0.0, 0.1, 0.1, 0.1]
