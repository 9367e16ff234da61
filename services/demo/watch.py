"""The trainer run as the pipeline sees it: WatchRun followed on a background thread, reconnecting if it drops."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common import channels, pb

TERMINAL = {pb.trainer.RUN_STATE_SUCCEEDED, pb.trainer.RUN_STATE_FAILED, pb.trainer.RUN_STATE_STOPPED}
EVAL_FIELDS = ("accuracy", "teacher_accuracy", "teacher_accuracy_best_prompt", "teacher_agreement", "kl",
               "top1_agreement", "perplexity", "gate_score")  # fmt: skip


@dataclass
class RunWatch:
    """The trainer run as seen through WatchRun (updated by a background thread)."""

    progress: pb.trainer.RunProgress | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _eval_dict(e: pb.trainer.EvalMetrics) -> dict[str, Any]:
    out: dict[str, Any] = {"step": e.step, "eval_prompts": e.eval_prompts}
    for name in EVAL_FIELDS:
        out[name] = getattr(e, name) if e.HasField(name) else None  # type: ignore[arg-type]
    out["gate_metric"] = e.gate_metric
    out["teacher_accuracy_by_variant"] = dict(e.teacher_accuracy_by_variant)
    return out


def watch_run(address: str, run_id: str, watch: RunWatch) -> None:
    """Follows WatchRun until the run ends (reconnecting if the stream drops)."""
    seen_steps: set[int] = set()
    seen_evals: set[int] = set()
    while not watch.done.is_set():
        try:
            with channels.channel(address) as channel:
                stub = pb.trainer_grpc.TrainerServiceStub(channel)
                for response in stub.WatchRun(pb.trainer.WatchRunRequest(run_id=run_id)):
                    p = response.progress
                    watch.progress = p
                    if p.step and p.step not in seen_steps:
                        seen_steps.add(p.step)
                        watch.history.append({"step": p.step, "loss": p.loss, **dict(p.loss_components),
                                              "tokens_per_s": p.tokens_per_s, "lag": p.lag})  # fmt: skip
                    if p.HasField("last_eval") and p.last_eval.step not in seen_evals:
                        seen_evals.add(p.last_eval.step)
                        watch.evals.append(_eval_dict(p.last_eval))
                    if p.state in TERMINAL:
                        watch.done.set()
                        return
        except grpc.RpcError as exc:
            watch.error = f"WatchRun: {exc.code().name}: {exc.details()}"
            time.sleep(1.0)
