"""Client load kept on the serving service while the trainer promotes students and serving hot-swaps them.

Runs `services.serving.loadtest` in consecutive short windows on a background thread until stopped, so the demo
can show live counts and stop the load the moment the run ends; streams open at a window's end are cut, not failed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.settings import READING_TARGET_WPM
from services.serving.loadtest import LoadtestConfig, StreamRecord, run_loadtest

WINDOW_S = 5.0


@dataclass
class StreamResult:
    ok: bool
    wpm: float | None
    versions: frozenset[int]
    tokens: int
    error: str | None


@dataclass
class LoadStats:
    finished: int
    failed: int
    below_target: int
    versions: set[int]


class ClientLoad:
    def __init__(
        self,
        address: str,
        chats: Sequence[Sequence[dict[str, str]]],
        streams: int,
        max_tokens: int,
        think_s: float,
        temperature: float,
    ) -> None:
        self.config = LoadtestConfig(
            address=address,
            concurrency=streams,
            duration_s=WINDOW_S,
            max_tokens=max_tokens,
            ignore_eos=False,  # answers end where the model ends them, as a user would see
            temperature=temperature,
            think_s=think_s,
            prompts=[[(m["role"], m["content"]) for m in chat] for chat in chats],
            min_wpm_tokens=4,
        )
        self._records: list[StreamRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-load", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        if self.config.concurrency > 0:  # 0 streams: no client load at all (`distillery bench onpolicy`)
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                result = asyncio.run(run_loadtest(self.config))
                with self._lock:
                    self._records.extend(result.streams)
        except BaseException as exc:  # surfaced in the report, never swallowed
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(WINDOW_S + 120)

    def results(self) -> list[StreamResult]:
        with self._lock:
            records = list(self._records)
        return [
            StreamResult(
                ok=r.error is None,
                wpm=r.wpm(self.config.min_wpm_tokens),
                versions=frozenset(r.versions),
                tokens=r.tokens,
                error=r.error,
            )
            for r in records
        ]

    def stats(self) -> LoadStats:
        results = self.results()
        return LoadStats(
            finished=len(results),
            failed=sum(1 for r in results if not r.ok),
            below_target=sum(1 for r in results if r.ok and r.wpm is not None and r.wpm < READING_TARGET_WPM),
            versions={v for r in results for v in r.versions},
        )
