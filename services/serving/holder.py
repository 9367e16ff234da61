"""The engine holder: which engine takes new streams, which ones are finishing old streams, and the idle standby.

Every stream leases the current `Slot` (an engine plus the model version it holds) for its whole life, so all of
its tokens come from one version. A slot is never reused for another version: a switch installs a new slot, and
the old one keeps its engine until its last stream ends. Leasing is synchronous (no await between reading
`current` and counting the stream), so a switch never loses a stream and a drain never misses one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from services.common.errors import Unavailable
from services.serving.engine import Engine
from services.serving.model import ModelInfo

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Slot:
    """An engine serving one model version, and the streams it has open."""

    engine: Engine
    model: ModelInfo
    active: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.active += 1
        self.idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Waits until no stream uses this slot; after `timeout_s` aborts the rest. True when they all finished."""
        try:
            await asyncio.wait_for(self.idle.wait(), timeout_s)
            return True
        except TimeoutError:
            logger.warning(
                "aborting streams that outlived the drain timeout",
                extra={"version": self.model.version, "streams": self.active, "timeout_s": timeout_s},
            )
            await self.engine.abort_all()
            await self.idle.wait()
            return False


class EngineHolder:
    """Serves new streams from `current`; `retiring` slots finish theirs; `standby` is an idle spare engine."""

    def __init__(self, on_change: Callable[[ModelInfo | None], None] | None = None) -> None:
        self.current: Slot | None = None
        self.standby: Slot | None = None
        self.retiring: set[Slot] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._on_change = on_change

    @property
    def model(self) -> ModelInfo | None:
        return self.current.model if self.current else None

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Slot]:
        """The slot one stream uses from its first to its last token."""
        if not self._open.is_set():
            await self._open.wait()  # an in-place swap is changing the weights under `current`
        slot = self.current
        if slot is None:
            raise Unavailable("no model is loaded yet: the service waits for the first promoted checkpoint")
        slot.enter()
        try:
            yield slot
        finally:
            slot.leave()

    def install(self, slot: Slot) -> Slot | None:
        """Sends new streams to `slot` (atomically: one assignment); returns the slot they went to before."""
        previous, self.current = self.current, slot
        if previous is not None:
            self.retiring.add(previous)
        if self._on_change is not None:
            self._on_change(slot.model)
        logger.info(
            "serving model version",
            extra={"version": slot.model.version, "model": slot.model.name, "run_id": slot.model.run_id},
        )
        return previous

    def close_gate(self) -> None:
        """New streams wait (in-place swap)."""
        self._open.clear()

    def open_gate(self) -> None:
        self._open.set()

    def engines(self) -> list[Engine]:
        slots = [self.current, self.standby, *self.retiring]
        return [s.engine for s in slots if s is not None]

    async def shutdown(self) -> None:
        """Stops every engine (service stop)."""
        slots = {s for s in (self.current, self.standby, *self.retiring) if s is not None}
        engines = {id(s.engine): s.engine for s in slots}
        self.current = self.standby = None
        self.retiring.clear()
        await asyncio.gather(*(e.shutdown() for e in engines.values()), return_exceptions=True)
