"""Hot-swap: verify a checkpoint, load and warm it beside the served one, switch new streams, retire the old one.

Strategies (`SwapSettings.strategy`):
- `standby` (default): a second engine of the same architecture waits idle. A checkpoint with the same
  fingerprint is reloaded into it in place (≈0.1 s: no engine start), checked, and installed; the old engine
  finishes its streams on the old weights and then becomes the next standby. Other architectures get a new engine.
- `engine`: every swap starts a new engine (an engine start: tens of seconds on CPU).
- `in_place`: one engine. New streams wait while the in-flight ones finish, then the weights are reloaded.

Whatever the strategy, a stream's tokens all come from one version, a failed load or warm-up leaves the old
version serving, and a version not newer than the served one is ignored (unless explicitly allowed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.outvocab import OutputVocabError
from services.common.outvocab import check_folder as check_output_vocab
from services.common.registry import CheckpointError, NotInRegistry, Registry, verify
from services.serving import metrics
from services.serving.engine import Engine, EngineFactory
from services.serving.holder import EngineHolder, Slot
from services.serving.model import ModelInfo
from services.serving.settings import SwapSettings

logger = logging.getLogger(__name__)


class SwapRefused(InvalidArgument):
    """The checkpoint cannot be served (verification, load or warm-up failed); the old version keeps serving."""

    def __init__(self, uri: str, why: str) -> None:
        super().__init__("registry_uri", uri, why)
        self.why = why


class SwapIgnored(FailedPrecondition):
    """The checkpoint is not newer than the served version."""


@dataclass(frozen=True)
class SwapResult:
    model: ModelInfo
    seconds: float
    path: str  # "reload", "engine" or "in_place"


def load_checkpoint(
    registry: Registry, uri: str, expect_version: int | None = None, expect_manifest: str = ""
) -> ModelInfo:
    """Verifies a checkpoint of `registry` (confined to it; sha256 of every file, safetensors only, a well-formed
    output vocabulary map where it has one), describes it."""
    try:
        ckpt = verify(registry.locate(uri))
    except NotInRegistry:
        raise
    except CheckpointError as exc:
        raise SwapRefused(uri, str(exc)) from exc
    if expect_version is not None and ckpt.version != expect_version:
        raise SwapRefused(uri, f"manifest version {ckpt.version} differs from the announced {expect_version}")
    if expect_manifest and ckpt.manifest_sha256 != expect_manifest:
        raise SwapRefused(uri, f"manifest sha256 {ckpt.manifest_sha256} differs from the announced {expect_manifest}")
    try:
        check_output_vocab(ckpt.path)
    except OutputVocabError as exc:
        raise SwapRefused(uri, f"malformed output vocabulary: {exc}") from exc
    try:
        return ModelInfo.from_checkpoint(ckpt)
    except (OSError, ValueError) as exc:
        raise SwapRefused(uri, f"unreadable config or tokenizer: {exc}") from exc


class Swapper:
    """Performs swaps one at a time on an `EngineHolder`."""

    def __init__(
        self,
        holder: EngineHolder,
        factory: EngineFactory,
        settings: SwapSettings,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.holder = holder
        self.on_fatal = on_fatal
        self.factory = factory
        self.settings = settings
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._standby_task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def served_version(self) -> int | None:
        model = self.holder.model
        return model.version if model else None

    async def swap_to(self, model: ModelInfo, *, allow_older: bool = False) -> SwapResult:
        """Serves `model` for new streams; raises SwapIgnored / SwapRefused and then leaves the old one serving."""
        started = time.perf_counter()
        async with self._lock:
            served = self.served_version
            if served is not None and model.version <= served and not allow_older:
                metrics.SWAPS.labels("ignored").inc()
                logger.info(
                    "ignored a checkpoint that is not newer", extra={"version": model.version, "served": served}
                )
                raise SwapIgnored(f"version {model.version} is not newer than the served version {served}")
            try:
                path = await self._swap(model)
            except Exception as exc:
                metrics.SWAPS.labels("failed").inc()
                logger.error(
                    "swap to version %d failed, the previous version keeps serving: %s",
                    model.version,
                    exc,
                    extra={"version": model.version, "uri": model.registry_uri or str(model.path), "error": str(exc)},
                )
                if isinstance(exc, SwapRefused):
                    raise
                raise SwapRefused(model.registry_uri or str(model.path), f"{type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        metrics.SWAPS.labels("ok").inc()
        metrics.SWAP_DURATION.observe(seconds)
        logger.info("swapped", extra={"version": model.version, "seconds": round(seconds, 3), "path": path})
        return SwapResult(model, seconds, path)

    async def _swap(self, model: ModelInfo) -> str:
        current = self.holder.current
        compatible = current is not None and current.model.swappable_with(model)
        if current is None or not compatible or self.settings.strategy == "engine":
            await self._swap_new_engine(model)
            return "engine"
        if self.settings.strategy == "in_place":
            await self._swap_in_place(current, model)
            return "in_place"
        engine = await self._idle_engine_for(model)
        if engine is None:
            await self._swap_new_engine(model)
            return "engine"
        try:
            await engine.reload(model.path)
        except Exception:
            # A failed reload can leave an engine half-loaded: never serve from it again.
            self._spawn(engine.shutdown())
            self._ensure_standby()
            raise
        try:
            await self._check(engine, model)
        except SwapRefused:
            # Its KV cache may hold NaNs now (they poison later requests): clear it before it waits as the standby.
            try:
                await engine.clear_cache()
            except Exception:
                self._spawn(engine.shutdown())
                self._ensure_standby()
                raise
            self._park(engine, model)
            raise
        self._install(Slot(engine, model), reuse_old=True)
        return "reload"

    async def _swap_new_engine(self, model: ModelInfo) -> None:
        engine = await self.factory(model.path)
        try:
            await self._check(engine, model)
        except BaseException:
            self._spawn(engine.shutdown())
            raise
        current = self.holder.current
        keep = current is not None and current.model.swappable_with(model) and self.settings.strategy == "standby"
        if not keep and self.holder.standby is not None:
            stale, self.holder.standby = self.holder.standby, None
            self._spawn(stale.engine.shutdown())
        self._install(Slot(engine, model), reuse_old=keep)
        self._ensure_standby()

    async def _swap_in_place(self, current: Slot, model: ModelInfo) -> None:
        self.holder.close_gate()
        try:
            await current.drain(self.settings.drain_timeout_s)
            engine = current.engine
            try:
                await engine.reload(model.path)
                await self._check(engine, model)
            except Exception:
                await self._restore(engine, current.model)
                raise
            self.holder.install(Slot(engine, model))
            self.holder.retiring.discard(current)
        finally:
            self.holder.open_gate()

    async def _restore(self, engine: Engine, model: ModelInfo) -> None:
        """Puts the served weights back after a failed in-place swap; the service cannot serve if that fails."""
        try:
            await engine.clear_cache()
            await engine.reload(model.path)
            await self._check(engine, model)
        except Exception as exc:
            logger.critical("could not restore the served weights after a failed swap", exc_info=exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            raise

    def _park(self, engine: Engine, model: ModelInfo) -> None:
        """Keeps an idle engine as the standby (its weights are replaced by the next reload), or stops it."""
        if self.holder.standby is None and self.settings.strategy == "standby":
            self.holder.standby = Slot(engine, model)
        else:
            self._spawn(engine.shutdown())

    async def _check(self, engine: Engine, model: ModelInfo) -> None:
        """Warm-up: a short greedy generation whose tokens and logprobs must be sane."""
        probe = await engine.probe(self.settings.warmup_tokens)
        problems = probe.problems(engine.vocab_size)
        if problems:
            raise SwapRefused(model.registry_uri or str(model.path), "warm-up failed: " + "; ".join(problems))
        logger.info("warm-up passed", extra={"version": model.version, "seconds": round(probe.seconds, 3)})

    async def _idle_engine_for(self, model: ModelInfo) -> Engine | None:
        """An idle engine that can take `model`'s weights: the standby, else an old slot once it has drained."""
        if self.holder.standby is None and self._standby_task is not None and not self._standby_task.done():
            await asyncio.shield(self._standby_task)
        standby = self.holder.standby
        if standby is not None and standby.model.swappable_with(model) and not standby.engine.errored:
            self.holder.standby = None
            return standby.engine
        for slot in list(self.holder.retiring):
            if slot.model.swappable_with(model) and not slot.engine.errored:
                await slot.drain(self.settings.drain_timeout_s)
                if slot in self.holder.retiring:
                    self.holder.retiring.discard(slot)
                    return slot.engine
        return None

    def _install(self, slot: Slot, *, reuse_old: bool) -> None:
        previous = self.holder.install(slot)
        if previous is not None:
            self._spawn(self._retire(previous, keep=reuse_old))

    async def _retire(self, slot: Slot, *, keep: bool) -> None:
        """Lets the old version finish its streams; then keeps its engine as the standby or stops it."""
        await slot.drain(self.settings.drain_timeout_s)
        if slot not in self.holder.retiring:
            return  # a swap took its engine meanwhile
        self.holder.retiring.discard(slot)
        current = self.holder.current
        if (
            keep
            and self.holder.standby is None
            and current is not None
            and current.engine is not slot.engine
            and slot.model.swappable_with(current.model)
        ):
            self.holder.standby = slot
            logger.info("old engine drained; kept as standby", extra={"version": slot.model.version})
            return
        logger.info("old engine drained; stopping it", extra={"version": slot.model.version})
        await slot.engine.shutdown()

    def _ensure_standby(self) -> None:
        """Starts a spare engine for the current model in the background (strategy `standby`)."""
        if self.settings.strategy != "standby" or self.holder.standby is not None:
            return
        if self._standby_task is not None and not self._standby_task.done():
            return
        current = self.holder.current
        if current is None or any(s.model.swappable_with(current.model) for s in self.holder.retiring):
            return  # a retiring engine becomes the standby when it drains
        self._standby_task = asyncio.create_task(self._start_standby(current.model))

    async def _start_standby(self, model: ModelInfo) -> None:
        try:
            engine = await self.factory(model.path)
        except Exception:
            logger.exception("could not start a standby engine; swaps will start engines instead")
            return
        if self._closing:
            await engine.shutdown()
            return
        try:
            # The first generation of a fresh engine is slow (kernel set-up): pay it now, not during a swap.
            await engine.probe(self.settings.warmup_tokens)
        except Exception:
            logger.exception("standby engine failed its first generation; stopping it")
            await engine.shutdown()
            return
        current = self.holder.current
        if self.holder.standby is None and current is not None and current.model.swappable_with(model):
            self.holder.standby = Slot(engine, model)
            logger.info("standby engine ready", extra={"model": model.name})
        else:
            await engine.shutdown()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start_initial(self, model: ModelInfo) -> None:
        """Serves the first model (no version check)."""
        async with self._lock:
            await self._swap_new_engine(model)

    async def wait_idle(self) -> None:
        """Waits for background retirements and standby starts (tests, shutdown)."""
        while self._tasks or (self._standby_task and not self._standby_task.done()):
            pending = list(self._tasks) + ([self._standby_task] if self._standby_task else [])
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Stops background work; an engine start in progress is waited for (its thread cannot be cancelled)."""
        self._closing = True
        if self._standby_task is not None:
            await asyncio.gather(self._standby_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
