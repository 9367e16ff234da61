"""`StepClock`: vLLM's output interval for a new stream, from the engine's measured step time."""

from __future__ import annotations

from services.serving.pacing import StepClock


def test_no_interval_or_no_measurement_asks_for_an_output_at_every_step() -> None:
    clock = StepClock()
    assert clock.token_interval(0.25) == 1  # nothing measured yet
    clock.observe(0.25, 10)
    assert clock.token_interval(0.0) == 1  # the service sends every step: vLLM must too


def test_the_interval_covers_a_share_of_the_stream_interval_at_the_measured_step() -> None:
    clock = StepClock(share=0.5, max_tokens=64)
    clock.observe(0.2, 10)  # 20 ms a step
    assert clock.token_interval(0.25) == 6  # 6 steps = 120 ms ≤ 125 ms
    assert clock.token_interval(0.03) == 1  # a step longer than the share: every step


def test_the_interval_is_capped_and_follows_slower_steps() -> None:
    clock = StepClock(smoothing=0.5, share=0.5, max_tokens=8)
    clock.observe(0.01, 10)  # 1 ms a step: 125 would fit, the cap says 8
    assert clock.token_interval(0.25) == 8
    for _ in range(20):
        clock.observe(0.5, 10)  # the load rises: 50 ms a step
    assert abs(clock.step_s - 0.05) < 1e-3  # type: ignore[operator]
    assert clock.token_interval(0.25) == 2


def test_chunks_without_tokens_or_time_are_ignored() -> None:
    clock = StepClock()
    clock.observe(0.1, 0)
    clock.observe(0.0, 5)
    clock.observe(float("nan"), 5)
    assert clock.step_s is None
