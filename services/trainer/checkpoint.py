"""Checkpoints: write the student and the trainer's state into the registry, find and load them for resume, gate.

A checkpoint folder is a plain Hugging Face model (model.safetensors in float32, config, tokenizer, chat template)
that transformers and vLLM load as is, plus `trainer_state/` — in a subfolder so model loaders that glob
`*.safetensors` never see it:

    trainer_state/optimizer.safetensors   AdamW moments and step per parameter, and the torch RNG state
    trainer_state/trainer.json            step, optimizer hyper-parameters, intake/buffer/eval-set state

Both are covered by the manifest's sha256s; nothing is pickled. The manifest's `kafka_offsets` are, per partition,
the oldest offset not yet fully trained (see buffer.py), so a restart re-reads from there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from google.protobuf.timestamp_pb2 import Timestamp
from safetensors.torch import load_file, save_file

from services.common import pb
from services.common.registry import Checkpoint, CheckpointError, Registry, verify
from services.trainer.recipes import LOWER_IS_BETTER
from services.trainer.student import copy_tokenizer

logger = logging.getLogger(__name__)

STATE_DIR = "trainer_state"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer.json"


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW state as flat tensors `state.<param index>.<name>` and its param groups as JSON."""
    sd = optimizer.state_dict()
    tensors = {
        f"state.{idx}.{name}": value.detach().to("cpu", copy=True).contiguous()
        for idx, entry in sd["state"].items()
        for name, value in entry.items()
        if isinstance(value, torch.Tensor)
    }
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    fixed = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": fixed})


def write_checkpoint(
    registry: Registry,
    model: Any,
    optimizer: torch.optim.Optimizer,
    tokenizer_dir: Path,
    *,
    run_id: str,
    step: int,
    parameter_count: int,
    metrics: dict[str, float],
    teacher: dict[str, str],
    run_spec: dict[str, Any],
    kafka_offsets: dict[str, dict[str, int]],
    trainer_state: dict[str, Any],
) -> Checkpoint:
    """Stages everything under the registry's tmp folder and registers it atomically."""
    staged = registry.staging_dir()
    model.save_pretrained(staged, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, staged)
    state_dir = staged / STATE_DIR
    state_dir.mkdir()
    tensors, groups = optimizer_to_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(state_dir / OPTIMIZER_FILE))
    (state_dir / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step, "param_groups": groups}))
    return registry.write(
        staged,
        run_id=run_id,
        step=step,
        parameter_count=parameter_count,
        metrics=metrics,
        teacher=teacher,
        run_spec=run_spec,
        kafka_offsets=kafka_offsets,
    )


@dataclass
class ResumePoint:
    checkpoint: Checkpoint
    state: dict[str, Any]
    optimizer_tensors: dict[str, torch.Tensor]


def load_resume_point(ckpt: Checkpoint) -> ResumePoint:
    """Verifies a checkpoint again (sha256 of every file, no pickle) and reads its trainer state."""
    ckpt = verify(ckpt.path)
    state_dir = ckpt.path / STATE_DIR
    if not (state_dir / STATE_FILE).is_file() or not (state_dir / OPTIMIZER_FILE).is_file():
        raise CheckpointError(f"{ckpt.path}: no {STATE_DIR}/ (not a trainer checkpoint)")
    state = json.loads((state_dir / STATE_FILE).read_text())
    return ResumePoint(ckpt, state, load_file(str(state_dir / OPTIMIZER_FILE)))


def newest_resume_point(registry: Registry, run_id: str) -> ResumePoint | None:
    """The newest checkpoint of a run that verifies; refused ones (wrong sha256, pickle files) are logged, skipped."""
    for ckpt in reversed(registry.checkpoints(run_id)):
        try:
            return load_resume_point(ckpt)
        except (CheckpointError, OSError, ValueError) as exc:
            logger.error("refusing checkpoint for resume", extra={"path": str(ckpt.path), "error": str(exc)})
    return None


def gate_metric(spec: pb.trainer.RunSpec) -> str:
    """The metric the run is gated on: the spec's, else accuracy with a checker and teacher_agreement without."""
    return spec.gate.metric or ("accuracy" if spec.checker else "teacher_agreement")


def passes_gate(
    metrics: dict[str, float], gate: pb.trainer.GateSpec, metric: str, promoted: Checkpoint | None
) -> tuple[bool, str]:
    """(promote?, why). `metric` is read from the checkpoint's held-out metrics; kl is better when lower.

    Accuracy must also reach `min_accuracy` and `min_accuracy_ratio` × the teacher's accuracy at its best prompt;
    `must_beat_promoted` compares with `promoted` (the last promoted checkpoint of the same use case) when it
    was scored on the same metric.
    """
    score = metrics.get(metric)
    if score is None:
        return False, f"no {metric} measured (held-out prompts not answered yet, or no checker/references)"
    lower = metric in LOWER_IS_BETTER
    # Proto floats are float32 (0.8 → 0.800000011…): compare with a tolerance far below one eval prompt.
    below = gate.HasField("min_score") and (
        (score > gate.min_score + 1e-6) if lower else (score < gate.min_score - 1e-6)
    )
    if below:
        relation = ">" if lower else "<"
        return False, f"{metric} {score:.3f} {relation} min_score {gate.min_score:.3f}"
    if metric == "accuracy":
        if score < gate.min_accuracy - 1e-6:
            return False, f"accuracy {score:.3f} < min_accuracy {gate.min_accuracy:.3f}"
        if gate.min_accuracy_ratio > 0:
            teacher = metrics.get("teacher_accuracy_best_prompt", metrics.get("teacher_accuracy"))
            if teacher is None:
                return False, "teacher accuracy unknown"
            if score < gate.min_accuracy_ratio * teacher - 1e-6:
                return False, f"accuracy {score:.3f} < {gate.min_accuracy_ratio} × teacher {teacher:.3f}"
    if gate.must_beat_promoted and promoted is not None:
        best = promoted.manifest.metrics.get(metric)
        if best is not None and ((score >= best) if lower else (score <= best)):
            return False, f"{metric} {score:.3f} does not beat promoted v{promoted.version} ({best:.3f})"
    return True, "passed"


def last_promoted_of_task(registry: Registry, task: str) -> Checkpoint | None:
    """The newest promoted checkpoint whose run was of the same use case (runs of other use cases don't compete)."""
    promoted = set(registry.promoted_versions())
    for ckpt in reversed(registry.checkpoints()):
        if ckpt.version in promoted and ckpt.manifest.run_spec.get("task", "") == task:
            return ckpt
    return None


def checkpoint_event(ckpt: Checkpoint, promoted: bool) -> pb.common.CheckpointEvent:
    created = Timestamp()
    created.FromNanoseconds(int(ckpt.manifest.created_at * 1e9))
    return pb.common.CheckpointEvent(
        run_id=ckpt.manifest.run_id,
        version=ckpt.version,
        registry_uri=ckpt.uri,
        manifest_sha256=ckpt.manifest_sha256,
        parameter_count=ckpt.manifest.parameter_count,
        metrics=ckpt.manifest.metrics,
        promoted=promoted,
        step=ckpt.manifest.step,
        teacher_model=ckpt.manifest.teacher.get("model", ""),
        created_at=created,
    )


def checkpoint_proto(ckpt: Checkpoint, promoted: bool) -> pb.trainer.Checkpoint:
    created = Timestamp()
    created.FromNanoseconds(int(ckpt.manifest.created_at * 1e9))
    return pb.trainer.Checkpoint(
        run_id=ckpt.manifest.run_id,
        version=ckpt.version,
        registry_uri=ckpt.uri,
        manifest_sha256=ckpt.manifest_sha256,
        step=ckpt.manifest.step,
        parameter_count=ckpt.manifest.parameter_count,
        metrics=ckpt.manifest.metrics,
        promoted=promoted,
        created_at=created,
    )
