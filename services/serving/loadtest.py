"""Load generator: N concurrent Generate streams against a serving address for a bounded time and/or count.

Measures what a reader would see — per-stream words per minute (words over the time from first to last token),
time to first token, inter-token latency — plus failures, tokens/s and which model versions answered; it can ask
the service to swap checkpoints (LoadModel) at an interval while the load runs. Usable as a library
(`await run_loadtest(LoadtestConfig(...))`) and as `distillery loadtest`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from services.common import channels, pb
from services.common.channels import ClientSettings
from services.common.security import AuthSettings, TlsSettings
from services.common.settings import READING_TARGET_WPM
from services.serving.metrics import count_words, words_per_minute

#: gRPC streams per connection before the load generator opens another channel.
STREAMS_PER_CHANNEL = 100


@dataclass
class LoadtestConfig:
    address: str
    concurrency: int = 8
    duration_s: float | None = 30.0
    """Stop opening streams after this long; open ones are cut at the deadline (None: only `max_streams`)."""
    max_streams: int | None = None
    """Stop after this many streams in all (None: only `duration_s`)."""
    max_tokens: int = 128
    ignore_eos: bool = True
    """Generate exactly `max_tokens` per stream, so runs compare like with like."""
    temperature: float = 1.0
    prompts: Sequence[Sequence[tuple[str, str]]] = ()
    """Chats to cycle through; default: prompts of the default built-in use case."""
    swap_uris: Sequence[str] = ()
    """Checkpoints to LoadModel, one every `swap_interval_s`, while the load runs."""
    swap_interval_s: float = 10.0
    stream_timeout_s: float = 600.0
    min_wpm_tokens: int = 4
    """Streams with fewer tokens than this get no words-per-minute figure."""
    think_s: float = 0.0
    """Pause of each simulated client between its streams (0: back to back, for capacity measurements)."""
    tls: TlsSettings | None = None
    """Client TLS; None: from `DISTILLERY_TLS_*`."""
    auth: AuthSettings | None = None
    """Client token; None: from `DISTILLERY_AUTH_*`."""
    client: ClientSettings | None = None
    """Load-balancing policy over the addresses `address` resolves to; None: from `DISTILLERY_GRPC_*`."""


@dataclass
class StreamRecord:
    started: float
    client: int = 0
    """Which simulated client (worker) opened the stream; each client's streams follow one another."""
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    words: int = 0
    versions: set[int] = field(default_factory=set)
    gaps: list[float] = field(default_factory=list)
    """Per-token inter-token latencies: a chunk of n tokens after a wait w counts n gaps of w/n."""
    gap_times: list[float] = field(default_factory=list)
    """When each gap ended (perf_counter), for windowed statistics."""
    error: str | None = None
    cut: bool = False
    finish_reason: int = 0

    def arrived(self, n: int, now: float) -> None:
        """`n` tokens came in one message at `now`: the first token is not a gap; a chunk of n tokens after a wait w
        counts n gaps of w/n, each ending at `now`."""
        if not n:
            return
        if self.first_token is None:
            self.first_token = now
            gaps, wait = n - 1, 0.0
        else:
            gaps, wait = n, now - (self.last_token or now)
        self.gaps.extend([wait / n] * gaps)
        self.gap_times.extend([now] * gaps)
        self.last_token = now
        self.tokens += n

    def wpm(self, min_tokens: int) -> float | None:
        if self.first_token is None or self.last_token is None or self.tokens < min_tokens:
            return None
        span = self.last_token - self.first_token
        return words_per_minute(self.words, span) if span > 0 else None


def steady_rate(streams: Sequence[StreamRecord], concurrency: int, finished: float) -> tuple[float, float] | None:
    """Tokens/s from the end of the first wave (the first `concurrency` streams opened, which all start at once) to
    `finished`, and that moment. Until then the load is not in its steady state: first every stream waits for its
    prefill at once (for the teacher at 256 streams, the first token came 2.5 s into the probe), then all of them
    decode with no prefill between (which flatters a slow model); from the first wave's end on, streams start and end
    at staggered times, prefills among the decode steps as in a steady load. None when a stream of the first wave did
    not end (cut at the deadline, failed, or no token) or less than a second is left."""
    first = sorted(streams, key=lambda s: s.started)[:concurrency]
    if not first or any(s.last_token is None or s.cut or s.error is not None for s in first):
        return None
    since = max(s.last_token for s in first if s.last_token is not None)
    if finished - since < 1.0:
        return None
    tokens = sum(
        (s.first_token is not None and s.first_token > since) + sum(1 for t in s.gap_times if t > since)
        for s in streams
    )
    return tokens / (finished - since), since


@dataclass
class SwapRecord:
    uri: str
    requested_at: float
    done_at: float
    version: int = 0
    error: str | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def default_prompts(n: int = 64) -> list[list[tuple[str, str]]]:
    """Chats of the default built-in use case, when a load test is given no prompts."""
    from services.tasks.builtin import default_prompts as examples

    return [[(m["role"], m["content"]) for m in e.content.chat()] for e in examples(n, seed=1)]


@dataclass
class LoadtestResult:
    config: LoadtestConfig
    started: float
    finished: float
    streams: list[StreamRecord]
    swaps: list[SwapRecord]

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        wall = self.finished - self.started
        done = [s for s in self.streams if s.error is None]
        wpms = [w for s in done if (w := s.wpm(cfg.min_wpm_tokens)) is not None]
        ttfts = [s.first_token - s.started for s in done if s.first_token is not None]
        gaps = [g for s in done for g in s.gaps]
        errors: dict[str, int] = {}
        for s in self.streams:
            if s.error is not None:
                errors[s.error] = errors.get(s.error, 0) + 1
        tokens = sum(s.tokens for s in self.streams)
        # Tokens stop at the deadline; the teardown after it (cancelling, closing channels) is not load.
        end = self.finished if cfg.duration_s is None else min(self.finished, self.started + cfg.duration_s)
        steady = steady_rate(self.streams, cfg.concurrency, end)

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 2)

        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 1)

        return {
            "address": cfg.address,
            "concurrency": cfg.concurrency,
            "duration_s": round(wall, 2),
            "streams": len(self.streams),
            "completed": sum(1 for s in done if not s.cut),
            "cut_at_deadline": sum(1 for s in done if s.cut),
            "failed": sum(errors.values()),
            "errors": errors,
            "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
            "tokens_per_s_steady": round(steady[0], 1) if steady else None,
            "steady_from_s": round(steady[1] - self.started, 2) if steady else None,
            "wpm_p10": r(percentile(wpms, 10)),
            "wpm_p50": r(percentile(wpms, 50)),
            "wpm_p90": r(percentile(wpms, 90)),
            "wpm_min": r(min(wpms) if wpms else None),
            "streams_below_target": sum(1 for w in wpms if w < READING_TARGET_WPM),
            "reading_target_wpm": READING_TARGET_WPM,
            "ttft_ms_p50": ms(percentile(ttfts, 50)),
            "ttft_ms_p99": ms(percentile(ttfts, 99)),
            "itl_ms_p50": ms(percentile(gaps, 50)),
            "itl_ms_p99": ms(percentile(gaps, 99)),
            "mixed_version_streams": sum(1 for s in self.streams if len(s.versions) > 1),
            "versions": sorted({v for s in self.streams for v in s.versions}),
            "swaps": [asdict(s) | {"seconds": round(s.done_at - s.requested_at, 3)} for s in self.swaps],
        }


async def _one_stream(stub: Any, request: pb.serving.GenerateRequest, record: StreamRecord, timeout_s: float) -> None:
    after_space = True
    call = stub.Generate(request, timeout=timeout_s)
    try:
        async for response in call:
            record.arrived(len(response.token_ids), time.perf_counter())
            added, after_space = count_words(response.text_delta, after_space)
            record.words += added
            record.versions.add(response.model_version)
            if response.finish_reason:
                record.finish_reason = response.finish_reason
    except asyncio.CancelledError:
        record.cut = True
        call.cancel()
        raise
    except grpc.aio.AioRpcError as exc:
        record.error = exc.code().name


async def run_loadtest(config: LoadtestConfig, stop: asyncio.Event | None = None) -> LoadtestResult:
    """Runs the load; returns every stream's record (`.summary()` gives the report). Setting `stop` ends it like
    `max_streams` does: no new streams, the open ones finish."""
    if config.duration_s is None and config.max_streams is None:
        raise ValueError("give duration_s and/or max_streams")
    prompts = list(config.prompts) or default_prompts()
    n_channels = max(1, math.ceil(config.concurrency / STREAMS_PER_CHANNEL))
    open_channels = [
        channels.aio_channel(config.address, tls=config.tls, auth=config.auth, client=config.client)
        for _ in range(n_channels)
    ]
    stubs = [pb.serving_grpc.ServingServiceStub(c) for c in open_channels]
    sampling = pb.common.SamplingParams(
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        extra={"ignore_eos": "true"} if config.ignore_eos else {},
    )
    records: list[StreamRecord] = []
    swaps: list[SwapRecord] = []
    counter = itertools.count()
    started = time.perf_counter()
    deadline = None if config.duration_s is None else started + config.duration_s

    def next_request() -> pb.serving.GenerateRequest | None:
        i = next(counter)
        if config.max_streams is not None and i >= config.max_streams:
            return None
        if deadline is not None and time.perf_counter() >= deadline:
            return None
        if stop is not None and stop.is_set():
            return None
        chat = prompts[i % len(prompts)]
        return pb.serving.GenerateRequest(
            messages=[pb.common.ChatMessage(role=r, content=c) for r, c in chat],
            sampling=sampling,
            request_id=f"loadtest-{i}",
        )

    async def worker(k: int) -> None:
        stub = stubs[k % len(stubs)]
        while (request := next_request()) is not None:
            record = StreamRecord(started=time.perf_counter(), client=k)
            records.append(record)
            await _one_stream(stub, request, record, config.stream_timeout_s)
            if config.think_s > 0:
                await asyncio.sleep(config.think_s)
            if record.error is not None:
                await asyncio.sleep(0.1)  # a refusing or absent service is not hammered in a tight loop

    async def swapper() -> None:
        stub = stubs[0]
        for uri in config.swap_uris:
            await asyncio.sleep(config.swap_interval_s)
            swap = SwapRecord(uri=uri, requested_at=time.perf_counter(), done_at=0.0)
            try:
                reply = await stub.LoadModel(pb.serving.LoadModelRequest(registry_uri=uri))
                swap.version = reply.model.version
            except grpc.aio.AioRpcError as exc:
                swap.error = f"{exc.code().name}: {exc.details()}"
            swap.done_at = time.perf_counter()
            swaps.append(swap)

    workers = [asyncio.create_task(worker(k)) for k in range(config.concurrency)]
    swap_task = asyncio.create_task(swapper()) if config.swap_uris else None
    try:
        if deadline is not None:
            _, pending = await asyncio.wait(workers, timeout=max(0.0, deadline - time.perf_counter()))
            for task in pending:
                task.cancel()  # streams still open at the deadline are cut, not failed
        await asyncio.gather(*workers, return_exceptions=True)
        if swap_task is not None:
            if deadline is not None:
                swap_task.cancel()
            await asyncio.gather(swap_task, return_exceptions=True)
    finally:
        for channel in open_channels:
            await channel.close()
    return LoadtestResult(config, started, time.perf_counter(), records, swaps)
