"""`StepClock`: vLLM's output interval for a new stream, from the engine's measured step time."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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


class _Collector:
    """vLLM's per-request output collector, scripted: each output comes `delay_s` after it is asked for."""

    def __init__(self, outputs: list[tuple[float, Any]]) -> None:
        self.outputs = outputs

    def put(self, output: Any) -> None:  # wrapped by the engine's `_end_of`
        pass

    def get_nowait(self) -> Any:
        return None

    async def get(self) -> Any:
        delay_s, output = self.outputs.pop(0)
        await asyncio.sleep(delay_s)
        self.put(output)
        return output

    def close(self) -> None:
        pass


def _output(tokens: int, finished: bool) -> Any:
    done = "length" if finished else None
    return SimpleNamespace(
        finished=finished, outputs=[SimpleNamespace(token_ids=[7] * tokens, text="x", finish_reason=done)]
    )


async def test_the_engine_asks_vllm_for_n_tokens_and_measures_steps_between_middle_chunks() -> None:
    """The request carries N from the clock; the step time comes from the middle chunks only. The last chunk comes
    as soon as the stream ends, with every token held back before it: measured, it would read as a very short step."""
    from services.serving.engine import Sampling, VllmEngine

    seen: dict[str, Any] = {}
    collector = _Collector([(0.0, _output(1, False)), (0.0, _output(5, False)), (0.0, _output(100, True))])

    async def add_request(request_id: str, prompt: Any, params: Any) -> _Collector:
        seen["params"] = params
        return collector

    llm = SimpleNamespace(
        get_tokenizer=lambda: None,
        model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 10),
        add_request=add_request,
        errored=False,
    )
    engine = VllmEngine(llm, Path("model"))
    engine._clock = StepClock(smoothing=1.0, share=0.5, max_tokens=8)  # the last observation wins
    engine._clock.step_s = 0.01
    chunks = [c async for c in engine.generate([1, 2], Sampling(max_tokens=106), "r", interval_s=0.1)]
    assert [len(c.token_ids) for c in chunks] == [1, 5, 100] and chunks[-1].finish_reason == "length"
    assert seen["params"].stream_interval == 5  # 0.1 s x 0.5 / 0.01 s
    # The middle chunk came one interval (0.1 s) after the first with 5 tokens: 20 ms a step. The last one, 100
    # tokens at once, would have read as 1 ms.
    assert engine._clock.step_s is not None and 0.015 < engine._clock.step_s < 0.2
    # Both are exported: the N this stream asked for and the step time measured since.
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("distillery_serving_stream_gather_tokens") == 5
    assert REGISTRY.get_sample_value("distillery_serving_engine_step_seconds") == engine._clock.step_s
