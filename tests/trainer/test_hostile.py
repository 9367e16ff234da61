"""Hostile StartRun and PromoteCheckpoint requests, in-process over gRPC: each refused with a status naming the
field, nothing outside the registry promoted, nothing the trainer did not write promoted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import save_file

from services.common import pb
from services.common.registry import NOT_OURS, Checkpoint, Registry
from services.trainer.main import TrainerApp
from tests.trainer.conftest import status_of, tiny_spec


def _write(registry: Registry, run_id: str) -> Checkpoint:
    staged = registry.staging_dir()
    save_file({"w": torch.ones(4, 4)}, str(staged / "model.safetensors"))
    (staged / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return registry.write(staged, run_id=run_id, step=1, parameter_count=16)


async def test_promote_names_only_checkpoints_this_trainer_wrote(app: TrainerApp, stub: Any, tmp_path: Path) -> None:
    registry = app.manager.registry
    foreign = _write(registry, "not-a-run-of-this-trainer")
    outside = tmp_path / "outside" / foreign.path.name
    shutil.copytree(foreign.path, outside)
    (tmp_path / "empty").mkdir()
    answers = set()
    for ref in (str(outside), outside.as_uri(), str(tmp_path / "empty"), str(tmp_path / "missing"), "/etc"):
        code, details = await status_of(stub.PromoteCheckpoint(pb.trainer.PromoteCheckpointRequest(registry_uri=ref)))
        answers.add((code, details.replace(ref, "REF")))
    assert answers == {(grpc.StatusCode.NOT_FOUND, f"registry_uri='REF': {NOT_OURS}")}
    code, details = await status_of(
        stub.PromoteCheckpoint(pb.trainer.PromoteCheckpointRequest(registry_uri="file://host/etc"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "host" in details
    assert details.startswith("registry_uri='file://host/etc':"), details  # the field it came in (was "version=0")
    for request in (
        pb.trainer.PromoteCheckpointRequest(version=foreign.version),
        pb.trainer.PromoteCheckpointRequest(checkpoint_id=foreign.path.name),
        pb.trainer.PromoteCheckpointRequest(registry_uri=foreign.uri),
    ):
        code, details = await status_of(stub.PromoteCheckpoint(request))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "only what it wrote" in details
    assert registry.promoted_versions() == []


async def test_hostile_run_specs_are_refused(app: TrainerApp, stub: Any, tmp_path: Path) -> None:
    def spec(edit: Any) -> pb.trainer.RunSpec:
        s = tiny_spec()
        edit(s)
        return s

    nan = float("nan")
    cases = {
        "spec.student.config.num_layers": lambda s: s.student.config.CopyFrom(
            pb.trainer.StudentShape(
                num_layers=65536, hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
            )
        ),
        "spec.student.pruned.layer_selection": lambda s: setattr(s.student.pruned, "layer_selection", 99),
        "spec.schedule.learning_rate": lambda s: setattr(s.schedule, "learning_rate", nan),
        "spec.loss.temperature": lambda s: setattr(s.loss, "temperature", nan),
        "spec.loss.jsd_beta": lambda s: setattr(s.loss, "jsd_beta", nan),
        "spec.gate.min_accuracy_ratio": lambda s: setattr(s.gate, "min_accuracy_ratio", nan),
        "spec.gate.min_score": lambda s: setattr(s.gate, "min_score", float("inf")),
        "spec.student.init_checkpoint": lambda s: setattr(s.student, "init_checkpoint", str(tmp_path)),
    }
    for field, edit in cases.items():
        code, details = await status_of(stub.StartRun(pb.trainer.StartRunRequest(spec=spec(edit))))
        assert (code, details.split("=")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, field), details
    assert app.manager.runs == {}


async def test_a_run_that_would_not_fit_in_memory_is_refused(app: TrainerApp, stub: Any) -> None:
    app.manager.settings.run_memory_fraction = 1e-9
    code, details = await status_of(stub.StartRun(pb.trainer.StartRunRequest(spec=tiny_spec())))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "GiB" in details
    assert app.manager.runs == {}
