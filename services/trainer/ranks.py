"""A run's torch.distributed ranks as child processes of the trainer service (settings.world_size > 1).

`RankGroup` stands in for `TrainingRun` in the run manager (same constructor, `run()` blocks and returns the final
state). It starts `world_size` processes (spawned, torchrun-style environment: MASTER_ADDR 127.0.0.1, a free
MASTER_PORT, RANK, WORLD_SIZE); rank 0 is a `TrainingRun(data_parallel=True)` and sends its progress back over a
queue, the others follow it (`parallel.DataParallel.follow`). Every rank dies with the service (PR_SET_PDEATHSIG).
When a rank dies, the others are killed and all are started again: they resume from the run's newest checkpoint as
a restarted trainer does (exact: `tests/trainer/test_ranks_process.py`), up to `rank_restarts` times. An error that
rank 0 reports (the run's own failure, not a lost rank) fails the run as it would with one rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import queue as queues
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.common import pb
from services.common.kafka import ProtoProducer
from services.common.logs import setup_logging
from services.common.models import load_causal_lm
from services.common.process import free_port, set_parent_death_signal
from services.common.registry import Registry, verify
from services.trainer import metrics
from services.trainer.checkpoint import load_resume_point, optimizer_from_tensors
from services.trainer.device import bf16_is_fast, rank_device
from services.trainer.loop import Progress, TrainingRun, make_optimizer
from services.trainer.parallel import DataParallel, RankLost, share_start
from services.trainer.settings import TrainerSettings
from services.trainer.spec import loss_weights

logger = logging.getLogger(__name__)

#: A rank's exit code when its group broke (another rank died): the launcher restarts the group.
LOST_EXIT = 75


class RanksFailed(RuntimeError):
    """The run's ranks kept dying: more restarts than `rank_restarts`."""


def init_group(rank: int, world: int, port: int, device: torch.device, timeout_s: float) -> None:
    """Joins the run's process group on 127.0.0.1:`port` (gloo on CPU, NCCL on CUDA), torchrun-style env."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))  # fmt: skip


def follow_run(settings: TrainerSettings, spec: pb.trainer.RunSpec, device: torch.device) -> int:
    """A rank > 0: loads the student rank 0 starts from (and its optimizer state on resume), takes rank 0's
    weights, then trains the slices it is sent until rank 0 stops. Returns the optimizer steps taken."""
    folder, resumed = share_start(device, None)
    if not folder:
        return 0  # rank 0 stopped before the run began
    model = load_causal_lm(Path(folder), dtype=torch.float32).to(device)
    model.train()
    body = torch.compile(model.model, dynamic=True) if settings.compile else None
    optimizer = make_optimizer(model, spec.schedule)
    if resumed:
        point = load_resume_point(verify(Path(folder)))
        optimizer_from_tensors(optimizer, point.optimizer_tensors, point.state["param_groups"])
    autocast = spec.schedule.bf16_autocast and bf16_is_fast(device)
    dp = DataParallel(model, optimizer, loss_weights(spec), loss_weights(spec, on_policy=True), autocast, device,
                      body=body)  # fmt: skip
    dp.sync_weights()
    return dp.follow()


def rank_main(
    rank: int,
    world: int,
    port: int,
    settings: TrainerSettings,
    spec_bytes: bytes,
    teacher_dir: Path,
    events: Any,
    stop: Any,
    evaluate_on_stop: Any,
    parent: int,
) -> None:
    """A rank process (spawned by `RankGroup`): exit 0 when the run ended, LOST_EXIT when the group broke, 1 when
    this rank failed (rank 0 also sends the error)."""
    set_parent_death_signal()
    if os.getppid() != parent:  # the launcher died before the line above took effect
        os._exit(LOST_EXIT)
    spec = pb.trainer.RunSpec.FromString(spec_bytes)  # generated classes do not pickle
    setup_logging("trainer", settings.log_level, settings.log_format)
    code = 0
    try:
        device = rank_device(settings.device, rank, world)
        # Ranks on one machine's CPU share its cores: torch_threads 0 means an equal share each.
        threads = settings.torch_threads or max(1, len(os.sched_getaffinity(0)) // world)
        settings = settings.model_copy(update={"device": str(device), "torch_threads": threads})
        try:
            init_group(rank, world, port, device, settings.rank_timeout_s)
        except RuntimeError as exc:  # e.g. the port was taken meanwhile: a restart picks another
            raise RankLost(f"rank {rank}: joining the group failed: {exc}") from exc
        logger.info("rank started", extra={"run_id": spec.run_id, "rank": rank, "world_size": world,
                                           "device": str(device), "backend": dist.get_backend()})  # fmt: skip
        if rank == 0:
            producer = ProtoProducer(settings.kafka, "trainer")
            try:
                run: TrainingRun | None = None

                def progress(p: pb.trainer.RunProgress) -> None:
                    events.put(("progress", p.SerializeToString(), run.student_parameters if run else 0))

                run = TrainingRun(settings, spec, teacher_dir, Registry(settings.registry), producer, progress,
                                  stop, evaluate_on_stop, data_parallel=True)  # fmt: skip
                events.put(("final", run.run()))
            finally:
                producer.close()
        else:
            follow_run(settings, spec, device)
    except RankLost as exc:
        logger.warning("rank lost its group", extra={"run_id": spec.run_id, "rank": rank, "error": str(exc)})
        code = LOST_EXIT
    except Exception as exc:
        logger.exception("rank failed", extra={"run_id": spec.run_id, "rank": rank})
        if rank == 0:
            events.put(("failed", f"{type(exc).__name__}: {exc}"))
        code = 1
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    events.close()
    events.join_thread()  # what was put reaches the launcher before this process ends
    sys.exit(code)


class RankGroup:
    """The run manager's view of a multi-rank run; see the module docstring."""

    def __init__(
        self,
        settings: TrainerSettings,
        spec: pb.trainer.RunSpec,
        teacher_dir: Path,
        registry: Registry,
        producer: ProtoProducer,
        on_progress: Progress,
        stop: threading.Event,
        evaluate_on_stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.teacher_dir = teacher_dir
        self.registry = registry
        self.on_progress = on_progress
        self.stop = stop
        self.evaluate_on_stop = evaluate_on_stop or threading.Event()
        self.student_parameters = 0
        self.world = settings.world_size
        self._last: pb.trainer.RunProgress | None = None

    @property
    def ranks_file(self) -> Path:
        """`{"attempt": n, "pids": [rank 0, rank 1, …]}` of the ranks now running (for operators and tests)."""
        return self.settings.work_dir / self.spec.run_id / "ranks.json"

    def run(self) -> int:
        """Trains until max_steps or `stop`; returns the final RunState; raises the run's error when it failed."""
        for rank in range(self.world):
            rank_device(self.settings.device, rank, self.world)  # a ValueError naming the setting, before forking
        for attempt in range(self.settings.rank_restarts + 1):
            if attempt:
                self.registry.discard_staging()  # what a killed rank 0 was writing; no rank runs now
            final = self._attempt(attempt)
            if final is not None:
                return final
            if self.stop.is_set():
                return pb.trainer.RUN_STATE_STOPPED  # resumes from its newest checkpoint when started again
            logger.warning("restarting the run's ranks from its newest checkpoint",
                           extra={"run_id": self.spec.run_id, "attempt": attempt + 1})  # fmt: skip
        raise RanksFailed(f"the run's ranks died {self.settings.rank_restarts + 1} times (rank_restarts="
                          f"{self.settings.rank_restarts}); see the trainer log")  # fmt: skip

    def _attempt(self, attempt: int) -> int | None:
        """One start of every rank: the final state, None when a rank died (restart), or the run's error raised."""
        ctx = multiprocessing.get_context("spawn")
        events = ctx.Queue()
        stop, evaluate = ctx.Event(), ctx.Event()
        port = free_port()
        spec = self.spec.SerializeToString()
        args = (self.world, port, self.settings, spec, self.teacher_dir, events, stop, evaluate, os.getpid())
        procs = [
            ctx.Process(target=rank_main, args=(r, *args), name=f"trainer-{self.spec.run_id}-rank{r}")
            for r in range(self.world)
        ]
        state: dict[str, Any] = {}
        try:
            for p in procs:
                p.start()  # from this thread, which outlives them: their parent-death signal is tied to it
            self.ranks_file.parent.mkdir(parents=True, exist_ok=True)
            self.ranks_file.write_text(json.dumps({"attempt": attempt, "port": port, "pids": [p.pid for p in procs]}))
            while True:
                if self.stop.is_set():
                    stop.set()
                if self.evaluate_on_stop.is_set():
                    evaluate.set()
                self._drain(events, state, 0.2)
                codes = [p.exitcode for p in procs]
                if codes[0] == 0:
                    self._drain(events, state, 0.0)
                    for p in procs[1:]:
                        p.join(60)  # rank 0 told them to stop
                    return int(state["final"]) if "final" in state else None
                if any(c not in (None, 0) for c in codes):
                    self._drain(events, state, 0.0)
                    died = any(c is not None and (c < 0 or c == LOST_EXIT) for c in codes)
                    if "failed" in state and not died:
                        raise RuntimeError(state["failed"])  # the run's own error, as with one rank
                    logger.error("a rank exited; stopping the others",
                                 extra={"run_id": self.spec.run_id, "exit_codes": codes})  # fmt: skip
                    return None
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                if p.pid is not None:  # started
                    p.join(30)
            events.close()
            events.cancel_join_thread()

    def _drain(self, events: Any, state: dict[str, Any], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                message = (
                    events.get(timeout=max(0.0, deadline - time.monotonic())) if timeout_s else events.get_nowait()
                )
            except queues.Empty:
                return
            kind = message[0]
            if kind == "progress":
                progress = pb.trainer.RunProgress.FromString(message[1])
                self.student_parameters = int(message[2])
                self._mirror(progress)
                self.on_progress(progress)
            else:
                state[kind] = message[1]
            timeout_s = 0.0

    def _mirror(self, p: pb.trainer.RunProgress) -> None:
        """This process's /metrics from rank 0's progress (rank 0 updates the gauges of its own process only)."""
        last = self._last or pb.trainer.RunProgress()
        metrics.STEP.set(p.step)
        metrics.TOKENS_PER_SECOND.set(p.tokens_per_s)
        metrics.LOSS.labels("total").set(p.loss)
        for name, value in p.loss_components.items():
            metrics.LOSS.labels(name).set(value)
        metrics.CONSUMER_LAG.set(p.lag)
        for name, count in p.tokens_by_source.items():
            if count > last.tokens_by_source.get(name, 0):
                metrics.TOKENS_TRAINED.labels(name).inc(count - last.tokens_by_source.get(name, 0))
        if p.last_checkpoint_version and p.last_checkpoint_version != last.last_checkpoint_version:
            metrics.CHECKPOINTS_WRITTEN.inc()
        if p.promoted_version and p.promoted_version != last.promoted_version:
            metrics.CHECKPOINTS_PROMOTED.inc()
        if p.last_eval.step != last.last_eval.step or p.last_eval.eval_prompts != last.last_eval.eval_prompts:
            for name, gauge in metrics.EVAL_GAUGES.items():
                if p.last_eval.HasField(name):  # type: ignore[arg-type]
                    gauge.set(getattr(p.last_eval, name))
            if p.last_eval.gate_metric and p.last_eval.HasField("gate_score"):
                metrics.GATE_SCORE.labels(p.last_eval.gate_metric).set(p.last_eval.gate_score)
        self._last = p
