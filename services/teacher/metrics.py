"""Teacher metrics (names are a contract with the dashboard and alerts), and the sampler that refreshes gauges.

Counters and histograms are updated where the work happens (servicer, worker); the gauges describing the engine
are sampled once a second by `run_sampler`, so the hot path never touches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from services.teacher.engine import TeacherEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

GENERATED_TOKENS = Counter(
    "distillery_teacher_generated_tokens_total",
    "Completion tokens the teacher generated (Generate streams and the Kafka pipeline).",
)
SCORED_TOKENS = Counter(
    "distillery_teacher_scored_tokens_total",
    "Reference-answer tokens the teacher scored for teacher-forced samples (prompt records with score_reference).",
)
SCORED_STUDENT_TOKENS = Counter(
    "distillery_teacher_scored_student_tokens_total",
    "Student completion tokens the teacher scored for on-policy samples (prompt records with score_completion).",
)
SAMPLES_PUBLISHED = Counter(
    "distillery_teacher_samples_published_total", "Teacher samples the broker acknowledged on the samples topic."
)
PROMPTS_CONSUMED = Counter(
    "distillery_teacher_prompts_consumed_total",
    "Prompt records the worker finished (samples acknowledged, or the record dead-lettered).",
)
BATCH_OCCUPANCY = Gauge(
    "distillery_teacher_batch_occupancy_ratio",
    "Sequences in the engine over vllm.max_num_seqs (1.0: the continuous batch is full).",
)
REQUESTS_RUNNING = Gauge(
    "distillery_teacher_requests_running", "Sequences in the engine, running or waiting for a batch slot."
)
PROMPT_LAG = Gauge(
    "distillery_teacher_prompt_lag_records",
    "Prompt records on this worker's partitions not yet read (from the fetch high-water marks).",
)
PROMPT_PARTITIONS = Gauge(
    "distillery_teacher_prompt_partitions_assigned",
    "Partitions of the prompts topic this worker owns now (the replicas of one consumer group split them; summed "
    "over replicas it is the topic's partition count once a rebalance settled).",
)
PROMPTS_IN_FLIGHT = Gauge("distillery_teacher_prompts_in_flight", "Prompts the worker has submitted and not finished.")
STREAMS_OPEN = Gauge("distillery_teacher_streams_open", "Generate streams open now.")
TIME_TO_FIRST_TOKEN = Histogram(
    "distillery_teacher_time_to_first_token_seconds",
    "From submitting a request to the engine to its first token.",
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "distillery_teacher_inter_token_latency_seconds",
    "Time between consecutive tokens of one completion (worker: the mean over each completion).",
    buckets=_ITL_BUCKETS,
)
REQUESTS_ABORTED = Counter(
    "distillery_teacher_requests_aborted_total", "Engine requests aborted before they finished (client cancel, error)."
)


async def run_sampler(
    engine: TeacherEngine, lag: Callable[[], int | None] | None = None, period_s: float = 1.0
) -> None:
    """Refreshes the engine gauges until cancelled."""
    while True:
        running = engine.num_unfinished()
        REQUESTS_RUNNING.set(running)
        BATCH_OCCUPANCY.set(min(running, engine.info.max_num_seqs) / engine.info.max_num_seqs)
        if lag is not None:
            value = lag()
            if value is not None:
                PROMPT_LAG.set(value)
        await asyncio.sleep(period_s)
