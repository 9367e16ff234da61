"""The run manager: one active run on a worker thread, a queue behind it, run files for resume, progress watchers.

Run files (`<home>/trainer/runs/<run_id>.json`: spec, state, timestamps, error) are rewritten atomically on every
state change. At start-up the manager resumes the run that was RUNNING (from its newest checkpoint) and requeues
QUEUED ones, so a trainer killed at any moment carries on where its last checkpoint left off. A graceful shutdown
stops the active run after a checkpoint but leaves it RUNNING on disk, so the next start resumes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import pb
from services.common.errors import FailedPrecondition, NotFound, ServiceError
from services.common.kafka import ProtoProducer
from services.common.models import parameter_count
from services.common.registry import Checkpoint, Registry
from services.trainer import budget
from services.trainer.device import resolve_device
from services.trainer.loop import TrainingRun
from services.trainer.ranks import RankGroup
from services.trainer.settings import TrainerSettings
from services.trainer.spec import complete, from_json, teacher_config_of, to_json

logger = logging.getLogger(__name__)

TERMINAL = (pb.trainer.RUN_STATE_SUCCEEDED, pb.trainer.RUN_STATE_FAILED, pb.trainer.RUN_STATE_STOPPED)


class _StoppedBeforeStart(Exception):
    """StopRun arrived before the worker began the run."""


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


@dataclass
class RunRecord:
    info: pb.trainer.RunInfo
    stop: threading.Event = field(default_factory=threading.Event)
    evaluate_on_stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    #: "starting" from the moment the worker takes the run until its first optimizer step of this attempt,
    #: "training" after, "" otherwise. Persisted: a trainer that died while a run was starting (killed for memory,
    #: say) marks that run FAILED at its next start instead of resuming it into the same death (a crash loop).
    phase: str = ""
    start_step: int = 0


class Watchers:
    """Wakes asyncio waiters (gRPC WatchRun streams) from the training thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, timeout_s: float) -> None:
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(entry)
        try:
            await asyncio.wait_for(entry[1].wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(entry)


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class RunManager:
    def __init__(self, settings: TrainerSettings, teacher_dir: Path, registry: Registry, producer: ProtoProducer):
        self.settings = settings
        self.teacher_dir = teacher_dir
        self.teacher_config = teacher_config_of(teacher_dir)
        self.teacher_parameters = parameter_count(teacher_dir)
        self.registry = registry
        self.producer = producer
        self.runs: dict[str, RunRecord] = {}
        self.queue: list[str] = []
        self.active: str | None = None
        self.lock = threading.RLock()
        self.watchers = Watchers()
        self.shutting_down = False
        self.fatal: BaseException | None = None
        settings.runs_dir.mkdir(parents=True, exist_ok=True)

    # --- persistence ---------------------------------------------------------------------------------------------

    def _persist(self, rec: RunRecord) -> None:
        info = rec.info
        data = {
            "spec": to_json(info.spec),
            "state": pb.trainer.RunState.Name(info.progress.state),
            "created_at": info.created_at.ToJsonString(),
            "error": info.progress.error,
            "phase": rec.phase,
            "updated_at": time.time(),
        }
        path = self.settings.runs_dir / f"{info.spec.run_id}.json"
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)

    def load_persisted(self) -> list[str]:
        """Reads every run file; resumes the RUNNING run and requeues QUEUED ones (when settings.resume)."""
        resumable: list[tuple[int, float, str]] = []
        for path in sorted(self.settings.runs_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                spec = from_json(data["spec"])
                state = pb.trainer.RunState.Value(data["state"])
            except (OSError, ValueError, KeyError) as exc:
                logger.error("unreadable run file", extra={"path": str(path), "error": str(exc)})
                continue
            info = pb.trainer.RunInfo(spec=spec, teacher_parameters=self.teacher_parameters)
            info.created_at.FromJsonString(data["created_at"])
            info.progress.run_id = spec.run_id
            info.progress.state = state
            info.progress.max_steps = spec.schedule.max_steps
            info.progress.error = data.get("error", "")
            latest = self.registry.latest(spec.run_id)
            if latest is not None:
                info.progress.step = latest.manifest.step
                info.progress.last_checkpoint_version = latest.version
            rec = RunRecord(info)
            self.runs[spec.run_id] = rec
            if state == pb.trainer.RUN_STATE_RUNNING and data.get("phase") == "starting":
                info.progress.error = ("the trainer stopped while this run was starting (killed, e.g. for memory); "
                                       "not resumed: start it again, smaller")  # fmt: skip
                logger.error("run died while starting; marked FAILED", extra={"run_id": spec.run_id})
                self._finish(rec, pb.trainer.RUN_STATE_FAILED)
                continue
            if state in (pb.trainer.RUN_STATE_RUNNING, pb.trainer.RUN_STATE_QUEUED):
                order = 0 if state == pb.trainer.RUN_STATE_RUNNING else 1
                resumable.append((order, info.created_at.ToNanoseconds(), spec.run_id))
        resumed = []
        if self.settings.resume:
            for _, _, run_id in sorted(resumable):
                rec = self.runs[run_id]
                rec.info.progress.state = pb.trainer.RUN_STATE_QUEUED
                self.queue.append(run_id)
                resumed.append(run_id)
            self._start_next()
        return resumed

    # --- RPC operations ------------------------------------------------------------------------------------------

    def start_run(self, spec: pb.trainer.RunSpec) -> pb.trainer.RunInfo:
        memory = int(budget.machine_bytes() * self.settings.run_memory_fraction)
        if self.settings.world_size > 1 and resolve_device(self.settings.device).type == "cpu":
            memory //= self.settings.world_size  # every rank holds a replica (weights, gradients, Adam) in this RAM
        # InvalidArgument naming the field; ResourceExhausted when the run would not fit in memory.
        full = complete(spec, self.teacher_config, self.settings.checker_modules, self.registry, memory)
        with self.lock:
            if full.run_id in self.runs:
                raise AlreadyExists(f"spec.run_id={full.run_id!r}: a run with this id exists")
            busy = self.active is not None or bool(self.queue)
            if busy and not full.queue:
                raise FailedPrecondition(
                    f"run {self.active or self.queue[0]!r} is active; set spec.queue=true to queue behind it"
                )
            info = pb.trainer.RunInfo(spec=full, teacher_parameters=self.teacher_parameters, created_at=_now())
            info.progress.run_id = full.run_id
            info.progress.state = pb.trainer.RUN_STATE_QUEUED
            info.progress.max_steps = full.schedule.max_steps
            rec = RunRecord(info)
            self.runs[full.run_id] = rec
            self.queue.append(full.run_id)
            self._persist(rec)
            self._start_next()
            return self._snapshot(rec)

    def get(self, run_id: str) -> pb.trainer.RunInfo:
        with self.lock:
            return self._snapshot(self._record(run_id))

    def stop(self, run_id: str, evaluate: bool = False) -> pb.trainer.RunInfo:
        """Stops a run in any state: a queued one at once; a running one checkpoints first (evaluated and gated with
        `evaluate`); one marked running with no worker (not resumed) at once. A finished run stays as it is."""
        with self.lock:
            rec = self._record(run_id)
            if run_id in self.queue:
                self.queue.remove(run_id)
                self._finish(rec, pb.trainer.RUN_STATE_STOPPED)
            elif rec.info.progress.state == pb.trainer.RUN_STATE_RUNNING:
                if evaluate:
                    rec.evaluate_on_stop.set()
                rec.stop.set()  # the worker checkpoints and marks it STOPPED
                if self.active != run_id or rec.thread is None or not rec.thread.is_alive():
                    self._finish(rec, pb.trainer.RUN_STATE_STOPPED)
            elif rec.info.progress.state not in TERMINAL:
                self._finish(rec, pb.trainer.RUN_STATE_STOPPED)
            return self._snapshot(rec)

    def _record(self, run_id: str) -> RunRecord:
        rec = self.runs.get(run_id)
        if rec is None:
            raise NotFound(f"run_id={run_id!r}: no such run")
        return rec

    def _snapshot(self, rec: RunRecord) -> pb.trainer.RunInfo:
        out = pb.trainer.RunInfo()
        out.CopyFrom(rec.info)
        return out

    async def watch(self, run_id: str, heartbeat_s: float = 5.0) -> AsyncIterator[pb.trainer.RunProgress]:
        """The run's progress now and after every change, until it reaches a terminal state."""
        last: bytes | None = None
        while True:
            with self.lock:
                progress = pb.trainer.RunProgress()
                progress.CopyFrom(self._record(run_id).info.progress)
            raw = progress.SerializeToString(deterministic=True)
            if raw != last:
                last = raw
                yield progress
            if progress.state in TERMINAL:
                return
            await self.watchers.wait(heartbeat_s)

    # --- the worker ----------------------------------------------------------------------------------------------

    def _start_next(self) -> None:
        with self.lock:
            if self.active is not None or not self.queue or self.shutting_down:
                return
            run_id = self.queue.pop(0)
            rec = self.runs[run_id]
            self.active = run_id
            rec.info.progress.state = pb.trainer.RUN_STATE_RUNNING
            rec.info.progress.updated_at.CopyFrom(_now())
            rec.phase, rec.start_step = "starting", rec.info.progress.step
            self._persist(rec)
            rec.thread = threading.Thread(target=self._work, args=(rec,), name=f"train-{run_id}", daemon=True)
            rec.thread.start()
        self.watchers.notify()

    def _on_progress(self, rec: RunRecord, progress: pb.trainer.RunProgress, run: TrainingRun | RankGroup) -> None:
        with self.lock:
            state = rec.info.progress.state
            rec.info.progress.CopyFrom(progress)
            rec.info.progress.state = state
            rec.info.student_parameters = run.student_parameters
            if rec.phase == "starting" and progress.step > rec.start_step:
                rec.phase = "training"
                self._persist(rec)
        self.watchers.notify()

    def _work(self, rec: RunRecord) -> None:
        spec = rec.info.spec
        final: int | None = None
        error = ""
        run: TrainingRun | RankGroup | None = None
        try:
            if rec.stop.is_set():
                raise _StoppedBeforeStart
            # One rank trains here; more are child processes behind a RankGroup (rank 0 checkpoints and announces).
            kind = TrainingRun if self.settings.world_size == 1 else RankGroup
            run = kind(
                self.settings, spec, self.teacher_dir, self.registry, self.producer,
                lambda p: self._on_progress(rec, p, run),  # type: ignore[arg-type]
                rec.stop,
                rec.evaluate_on_stop,
            )  # fmt: skip
            final = run.run()
        except _StoppedBeforeStart:
            final = pb.trainer.RUN_STATE_STOPPED
        except Exception as exc:
            logger.exception("run failed", extra={"run_id": spec.run_id})
            final, error = pb.trainer.RUN_STATE_FAILED, f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.active = None
            rec.phase = ""
            if self.shutting_down and final != pb.trainer.RUN_STATE_FAILED:
                # Stopped by a graceful shutdown, not by StopRun: stays RUNNING on disk, resumed at next start.
                self._persist(rec)  # the phase: it did not die while starting
                rec.info.progress.state = pb.trainer.RUN_STATE_STOPPED
            else:
                rec.info.progress.error = error
                self._finish(rec, final if final is not None else pb.trainer.RUN_STATE_FAILED)
        self.watchers.notify()
        self._start_next()

    def _finish(self, rec: RunRecord, state: int) -> None:
        rec.info.progress.state = state  # type: ignore[assignment]
        rec.info.progress.updated_at.CopyFrom(_now())
        self._persist(rec)

    def shutdown(self, timeout_s: float) -> None:
        """Stops the active run (it checkpoints first) without marking it stopped on disk; waits for it."""
        with self.lock:
            self.shutting_down = True
            active = self.runs.get(self.active) if self.active else None
        if active is not None and active.thread is not None:
            active.stop.set()
            active.thread.join(timeout_s)
            if active.thread.is_alive():
                logger.warning("run did not stop in time", extra={"run_id": active.info.spec.run_id})

    def wrote(self, ckpt: Checkpoint) -> bool:
        """Whether a checkpoint was written by one of this trainer's runs (in its registry, under its run id)."""
        with self.lock:
            return ckpt.path.parent == self.registry.root / "checkpoints" and ckpt.manifest.run_id in self.runs

    def checkpoints(self, run_id: str, promoted_only: bool) -> list[Any]:
        if run_id and run_id not in self.runs and not self.registry.checkpoints(run_id):
            raise NotFound(f"run_id={run_id!r}: no such run")
        found = self.registry.checkpoints(run_id or None)
        return [c for c in found if not promoted_only or self.registry.is_promoted(c.version)]
