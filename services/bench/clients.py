"""Benchmark load from processes of their own: the load generator and the direct-engine driver.

A load generator in the benchmark's own process shares its interpreter (and, on a small machine, its cores) with
whatever else the benchmark does, and every token it reads costs it a protobuf parse and a wake-up: more for the
faster model. Here each runs in a spawned child process (`ProcessPoolExecutor`, spawn context), which exits when
the benchmark dies (a watchdog thread on the parent PID: the children are started from a pool thread, where
PR_SET_PDEATHSIG would fire when that thread ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from typing import Any, TypeVar

from services.serving.loadtest import LoadtestConfig, LoadtestResult

T = TypeVar("T")


def _child_init(parent: int) -> None:
    from services.common.process import exit_when_parent_dies

    exit_when_parent_dies(parent=parent)


@contextlib.contextmanager
def child_pool(processes: int = 1) -> Iterator[ProcessPoolExecutor]:
    """Spawned worker processes that die with this one; shut down (and their work cancelled) on exit."""
    pool = ProcessPoolExecutor(
        max_workers=processes, mp_context=get_context("spawn"), initializer=_child_init, initargs=(os.getpid(),)
    )
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


async def in_child(pool: ProcessPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def _run_loadtest(config: LoadtestConfig) -> LoadtestResult:
    from services.serving.loadtest import run_loadtest

    return asyncio.run(run_loadtest(config))


def split(total: int, parts: int) -> list[int]:
    """`total` concurrent streams over at most `parts` processes, as evenly as possible (no empty share)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def merge(config: LoadtestConfig, results: list[LoadtestResult]) -> LoadtestResult:
    """One result from several processes' (perf_counter is the system's monotonic clock in every process)."""
    return LoadtestResult(
        config=config,
        started=min(r.started for r in results),
        finished=max(r.finished for r in results),
        streams=[s for r in results for s in r.streams],
        swaps=[s for r in results for s in r.swaps],
    )


async def loadtest_in_children(pool: ProcessPoolExecutor, config: LoadtestConfig, processes: int) -> LoadtestResult:
    """`run_loadtest(config)` with its streams spread over `processes` child processes of `pool`."""
    shares = split(config.concurrency, processes)
    parts = await asyncio.gather(*(in_child(pool, _run_loadtest, replace(config, concurrency=c)) for c in shares))
    return merge(config, list(parts))
