"""Serving metrics, measured against the 238 words-per-minute reading target.

`StreamMeter` collects one stream's timings and words as its chunks go out; `OpenStreams` keeps the open meters so
a once-a-second sweep can say how many streams are currently slower than a reader. Exported names are the contract
with the dashboard and alerts (see the architecture notes).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram, Info

from services.common.metrics import READING_TARGET  # noqa: F401  (exports the 238 wpm gauge from this process)
from services.common.settings import READING_TARGET_WPM

WPM_BUCKETS = (60, 120, 180, 238, 300, 400, 600, 1000, 2000, 5000)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

GENERATED_TOKENS = Counter("distillery_serving_generated_tokens_total", "Tokens streamed to clients.")
STREAM_WPM = Histogram(
    "distillery_serving_stream_words_per_minute",
    "Words per minute of each finished stream: words of its text over its time from first to last token.",
    buckets=WPM_BUCKETS,
)
STREAMS_BELOW_TARGET = Gauge(
    "distillery_serving_streams_below_target",
    "Open streams currently delivering fewer words per minute than the reading target.",
)
STREAMS = Counter("distillery_serving_streams_total", "Generate streams by how they ended.", ["result"])
TTFT = Histogram(
    "distillery_serving_time_to_first_token_seconds",
    "From the request's arrival to its first token.",
    buckets=LATENCY_BUCKETS,
)
ITL = Histogram(
    "distillery_serving_inter_token_latency_seconds",
    "Time between consecutive tokens of a stream (a chunk of n tokens counts n gaps of 1/n of its wait).",
    buckets=LATENCY_BUCKETS,
)
ACTIVE_STREAMS = Gauge("distillery_serving_active_streams", "Generate streams open now.")
ENGINE_STEP = Gauge(
    "distillery_serving_engine_step_seconds",
    "The engine's recent time per token of one stream, measured between paced streams' chunks "
    "(services/serving/pacing.py); 0 until measured.",
)
GATHER_TOKENS = Gauge(
    "distillery_serving_stream_gather_tokens",
    "Tokens vLLM gathers before it builds an output for the newest stream (its stream_interval; 1: an output at "
    "every engine step).",
)
WPM_HEADROOM = Gauge(
    "distillery_serving_wpm_headroom_ratio",
    "Median words per minute of the open streams (each over its time so far, once it is a second old) over the "
    "reading target: 1 is reading speed, above 1 spare speed; +Inf with no stream to judge. The autoscaler's signal.",
)
WPM_HEADROOM.set(math.inf)
MODEL_VERSION = Gauge("distillery_serving_model_version", "Registry version of the model new streams go to.")
MODEL_INFO = Info("distillery_serving_model", "The model new streams go to: version, run id and name.")
SWAPS = Counter("distillery_serving_swaps_total", "Model swaps by result.", ["result"])
SWAP_DURATION = Histogram(
    "distillery_serving_swap_duration_seconds",
    "From a swap's start to new streams going to the new version.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
ENGINES = Gauge(
    "distillery_serving_engines",
    "Engines by role: serving (takes new streams), standby (idle spare for fast swaps), retiring (finishing streams).",
    ["role"],
)
for _result in ("ok", "error", "cancelled"):
    STREAMS.labels(_result)
for _result in ("ok", "failed", "ignored"):
    SWAPS.labels(_result)

#: A stream is judged against the target only after this long, so its first word does not decide.
BELOW_TARGET_GRACE_S = 1.0


def count_words(delta: str, after_space: bool) -> tuple[int, bool]:
    """Words that start in `delta` given whether the text before it ended in whitespace (or was empty).

    Returns (new words, whether the text now ends in whitespace). Streaming word counts add up to
    `len(full_text.split())`.
    """
    if not delta:
        return 0, after_space
    words = len(delta.split())
    if words and not after_space and not delta[0].isspace():
        words -= 1  # the first piece continues the previous word
    return words, delta[-1].isspace()


def words_per_minute(words: int, seconds: float) -> float:
    return words * 60.0 / seconds if seconds > 0 else 0.0


@dataclass(eq=False)
class StreamMeter:
    """One stream's timings and words."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    words: int = 0
    _after_space: bool = True

    def chunk(self, text: str, tokens: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if tokens:
            if self.first_token is None:
                self.first_token = now
                TTFT.observe(now - self.started)
                gaps = tokens - 1
                wait = 0.0
            else:
                gaps = tokens
                wait = now - (self.last_token or now)
            for _ in range(gaps):
                ITL.observe(wait / tokens)
            self.last_token = now
            self.tokens += tokens
            GENERATED_TOKENS.inc(tokens)
        added, self._after_space = count_words(text, self._after_space)
        self.words += added

    def wpm(self) -> float | None:
        """Words per minute from first to last token; None with fewer than two tokens' worth of time."""
        if self.first_token is None or self.last_token is None or self.last_token <= self.first_token:
            return None
        return words_per_minute(self.words, self.last_token - self.first_token)

    def wpm_so_far(self, now: float) -> float | None:
        """Words per minute from the first token (or, before it, from the request) until now; None during the grace
        period. A stream still waiting for its first token counts at 0: queueing is what a reader sees first."""
        origin = self.first_token if self.first_token is not None else self.started
        elapsed = now - origin
        return words_per_minute(self.words, elapsed) if elapsed >= BELOW_TARGET_GRACE_S else None

    def below_target(self, now: float, target: float = READING_TARGET_WPM) -> bool:
        """Whether the stream is slower than a reader right now (after the grace period)."""
        wpm = self.wpm_so_far(now)
        return wpm is not None and wpm < target

    def finish(self, result: str) -> None:
        STREAMS.labels(result).inc()
        wpm = self.wpm()
        if wpm is not None and result == "ok":
            STREAM_WPM.observe(wpm)


def headroom(speeds: list[float], target: float = READING_TARGET_WPM) -> float:
    """Median stream speed over the reading target (+Inf for no streams: nothing limits a reader).

    The median, as the slow-stream alert uses: one stalled client does not scale the Deployment. The autoscaler
    scales on its reciprocal (deploy/k8s/components/keda), which grows in proportion to the streams a replica holds
    while the replica is compute-bound."""
    return statistics.median(speeds) / target if speeds else math.inf


class OpenStreams:
    """The open streams' meters, and the sweep that keeps the below-target and headroom gauges current."""

    def __init__(self) -> None:
        self.meters: set[StreamMeter] = set()

    def open(self) -> StreamMeter:
        meter = StreamMeter()
        self.meters.add(meter)
        ACTIVE_STREAMS.set(len(self.meters))
        return meter

    def close(self, meter: StreamMeter, result: str) -> None:
        self.meters.discard(meter)
        ACTIVE_STREAMS.set(len(self.meters))
        meter.finish(result)

    def __len__(self) -> int:
        return len(self.meters)

    def sweep(self) -> int:
        """Updates the below-target and headroom gauges from the open streams; returns how many are below."""
        now = time.perf_counter()
        speeds = [w for m in self.meters if (w := m.wpm_so_far(now)) is not None]
        below = sum(1 for w in speeds if w < READING_TARGET_WPM)
        STREAMS_BELOW_TARGET.set(below)
        WPM_HEADROOM.set(headroom(speeds))
        return below

    async def run_sweeper(self, interval_s: float = 1.0) -> None:
        while True:
            self.sweep()
            await asyncio.sleep(interval_s)
