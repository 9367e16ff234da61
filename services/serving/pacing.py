"""How many tokens vLLM may gather for a stream before it builds an output, under the service's stream interval.

The service sends a stream's tokens at most once per `stream_interval_ms` (`VllmEngine.generate` merges what came
meanwhile). vLLM's front end still builds a `RequestOutput` for every stream at every engine step, and the service
still merges them, unless the request asks for fewer (`SamplingParams.stream_interval`: an output every N tokens,
the first and the last at once; vLLM's `--stream-interval` is the same for a whole server). `StepClock` picks that
N for a new stream from the engine's recent time per token of one stream (its step time), so that N tokens take
about `share` of the interval, and at most `max_tokens`.

The two delays add up: a token vLLM holds for up to N−1 steps may then miss the service's send and wait for the
next one, so a token waits at most the interval plus N−1 of the engine's steps: 1.5 intervals (375 ms at the
default 250) at the step time its stream started with, more if the steps slow down during the stream. The cap
bounds what a sudden rise in load can do to streams that started on a quiet engine (at most 7 steps more: 147 ms
for the default student at 256 streams on 2 cores, where a step takes ≈21 ms).

The step time is measured between a stream's chunks, leaving out its first (prefill, queueing) and its last (which
comes as soon as the stream ends, with tokens vLLM held before the previous send).

Measured through the service (the default student, 256 streams × 128 tokens, 250 ms interval, 2 cores, 30 s
probes, alternating), with N fixed at 8 by an experiment patch: 8,524, 8,538, 8,728 and 8,269 tokens/s with an
output at every step, 8,879 and 8,828 with N=8, the service's process at 0.31 of a core instead of 0.34. This
code's own N is exported (`distillery_serving_stream_gather_tokens`, with the step time it comes from in
`distillery_serving_engine_step_seconds`): in the same setting at ≈35–40 ms a step it was mostly 2 (1–4), so the
default gets less than that A/B's N=8. A share of 1.0 instead of 0.5 (N mostly 4–5) measured +4.8%, within the
spread of one setting, and was not adopted: README, "The student at 9.4×".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepClock:
    """The engine's recent seconds per token of one stream, from the streams' own chunks."""

    smoothing: float = 0.05
    """Weight of each new observation in the moving average."""
    share: float = 0.5
    """Part of the stream interval that N tokens may take at the measured step time."""
    max_tokens: int = 8
    step_s: float | None = None

    def observe(self, seconds: float, tokens: int) -> None:
        """A stream received `tokens` tokens `seconds` after its previous chunk."""
        if tokens < 1 or not seconds > 0:
            return
        per_token = seconds / tokens
        self.step_s = per_token if self.step_s is None else self.step_s + self.smoothing * (per_token - self.step_s)

    def token_interval(self, interval_s: float) -> int:
        """N for a stream starting now under `interval_s` (1: an output at every step, vLLM's default)."""
        if interval_s <= 0 or not self.step_s:
            return 1
        return max(1, min(self.max_tokens, int(interval_s * self.share / self.step_s)))
