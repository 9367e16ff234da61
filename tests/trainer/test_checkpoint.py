"""Checkpoints: bit-identical reload into transformers, exact optimizer state, refusal of tampered or pickle ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from services.common import pb
from services.common.models import load_causal_lm
from services.common.registry import Registry, sha256_file
from services.trainer.checkpoint import (
    gate_metric,
    load_resume_point,
    newest_resume_point,
    optimizer_from_tensors,
    passes_gate,
    write_checkpoint,
)
from services.trainer.student import make_student


def _trained(tiny_teacher: Path, folder: Path) -> tuple[Any, torch.optim.Optimizer]:
    recipe = pb.trainer.StudentRecipe(pruned=pb.trainer.PrunedStudent(num_layers=1, calibration_samples=4))
    make_student(tiny_teacher, recipe, folder)
    model = load_causal_lm(folder, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.tensor([[1, 5, 9, 12, 40]]), labels=torch.tensor([[1, 5, 9, 12, 40]])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _write(registry: Registry, model: Any, optimizer: Any, tok: Path, step: int) -> Any:
    return write_checkpoint(
        registry, model, optimizer, tok, run_id="r", step=step, parameter_count=7, metrics={"accuracy": 0.5},
        teacher={"model": "tiny"}, run_spec={"run_id": "r"}, kafka_offsets={"samples": {"0": 3, "1": 5}},
        trainer_state={"buffer": {"safe": {"0": 3}}},
    )  # fmt: skip


def test_checkpoint_reloads_bit_identically_with_its_optimizer(tiny_teacher: Path, tmp_path: Path) -> None:
    model, optimizer = _trained(tiny_teacher, tmp_path / "init")
    registry = Registry(tmp_path / "registry")
    ckpt = _write(registry, model, optimizer, tmp_path / "init", step=2)
    manifest = ckpt.manifest
    assert manifest.kafka_offsets == {"samples": {"0": 3, "1": 5}} and manifest.teacher == {"model": "tiny"}
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state/optimizer.safetensors"} <= set(
        manifest.files
    )

    reloaded = load_causal_lm(ckpt.path, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    reloaded.save_pretrained(tmp_path / "resaved", safe_serialization=True)
    assert sha256_file(tmp_path / "resaved" / "model.safetensors") == manifest.files["model.safetensors"]["sha256"]

    point = load_resume_point(ckpt)
    assert point.state["step"] == 2
    fresh = torch.optim.AdamW(reloaded.parameters(), lr=1e-2)
    optimizer_from_tensors(fresh, point.optimizer_tensors, point.state["param_groups"])
    for idx, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, fresh.state_dict()["state"][idx][key]), (idx, key)
    assert fresh.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]


def test_tampered_or_pickle_checkpoints_are_refused_for_resume(tiny_teacher: Path, tmp_path: Path) -> None:
    model, optimizer = _trained(tiny_teacher, tmp_path / "init")
    registry = Registry(tmp_path / "registry")
    older = _write(registry, model, optimizer, tmp_path / "init", step=1)
    newer = _write(registry, model, optimizer, tmp_path / "init", step=2)
    assert newest_resume_point(registry, "r").checkpoint.version == newer.version  # type: ignore[union-attr]

    weights = newer.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, wrong sha256
    weights.write_bytes(bytes(data))
    point = newest_resume_point(registry, "r")
    assert point is not None and point.checkpoint.version == older.version

    shutil.copy(older.path / "config.json", older.path / "pytorch_model.bin")  # a pickle-format file appears
    assert newest_resume_point(registry, "r") is None


def test_gate_on_accuracy() -> None:
    gate = pb.trainer.GateSpec(min_accuracy_ratio=0.8, must_beat_promoted=True, min_accuracy=0.1)
    promoted: Any = SimpleNamespace(version=3, manifest=SimpleNamespace(metrics={"accuracy": 0.45}))
    assert not passes_gate({}, gate, "accuracy", None)[0]  # nothing measured
    assert not passes_gate({"accuracy": 0.05, "teacher_accuracy": 0.0}, gate, "accuracy", None)[0]  # < min_accuracy
    assert not passes_gate({"accuracy": 0.3, "teacher_accuracy": 0.5}, gate, "accuracy", None)[0]  # < 0.8 × teacher
    assert passes_gate({"accuracy": 0.4, "teacher_accuracy": 0.5}, gate, "accuracy", None)[0]
    assert not passes_gate({"accuracy": 0.45, "teacher_accuracy": 0.5}, gate, "accuracy", promoted)[0]  # beat 0.45
    assert passes_gate({"accuracy": 0.5, "teacher_accuracy": 0.5}, gate, "accuracy", promoted)[0]
    assert passes_gate({"accuracy": 0.6, "teacher_accuracy": 0.5}, gate, "accuracy", promoted)[0]


def test_gate_compares_with_the_teacher_at_its_best_prompt() -> None:
    gate = pb.trainer.GateSpec(min_accuracy_ratio=1.0)
    scores = {"accuracy": 0.3, "teacher_accuracy": 0.25, "teacher_accuracy_best_prompt": 0.35}
    ok, why = passes_gate(scores, gate, "accuracy", None)
    assert not ok and "teacher 0.350" in why


def test_gate_without_a_checker_reads_the_fidelity_metric() -> None:
    """A checker-less run gates on agreement with the teacher; kl gates the other way round (lower is better)."""
    gate = pb.trainer.GateSpec(must_beat_promoted=True, min_score=0.2)
    promoted: Any = SimpleNamespace(version=2, manifest=SimpleNamespace(metrics={"teacher_agreement": 0.3, "kl": 1.0}))
    assert not passes_gate({"kl": 0.5}, gate, "teacher_agreement", None)[0]  # not measured
    assert not passes_gate({"teacher_agreement": 0.1}, gate, "teacher_agreement", None)[0]  # under min_score
    assert passes_gate({"teacher_agreement": 0.25}, gate, "teacher_agreement", None)[0]
    assert not passes_gate({"teacher_agreement": 0.25}, gate, "teacher_agreement", promoted)[0]
    assert passes_gate({"teacher_agreement": 0.35}, gate, "teacher_agreement", promoted)[0]
    kl_gate = pb.trainer.GateSpec(must_beat_promoted=True, min_score=2.0)
    assert not passes_gate({"kl": 2.5}, kl_gate, "kl", None)[0]  # above the bound
    assert not passes_gate({"kl": 1.2}, kl_gate, "kl", promoted)[0]  # worse than the promoted 1.0
    assert passes_gate({"kl": 0.8}, kl_gate, "kl", promoted)[0]
    assert gate_metric(pb.trainer.RunSpec(checker="numeric")) == "accuracy"
    assert gate_metric(pb.trainer.RunSpec()) == "teacher_agreement"
    assert gate_metric(pb.trainer.RunSpec(gate=pb.trainer.GateSpec(metric="kl"))) == "kl"


VLLM_SCRIPT = """
import json, sys
from pathlib import Path
from services.common.vllm_engine import VllmSettings, engine_kwargs
settings = VllmSettings(kv_cache_gib=0.25, max_model_len=128, max_num_seqs=2, enforce_eager=True)
from vllm import LLM, SamplingParams
llm = LLM(**engine_kwargs(Path(sys.argv[1]), settings))
out = llm.generate([{"prompt_token_ids": [1, 5, 9, 12]}], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
"""


@pytest.mark.e2e
def test_checkpoint_loads_in_vllm(tiny_teacher: Path, tmp_path: Path) -> None:
    """An offline vllm.LLM (in-process engine, in a child process) generates from a registry checkpoint."""
    import os
    import subprocess
    import sys

    model, optimizer = _trained(tiny_teacher, tmp_path / "init")
    ckpt = _write(Registry(tmp_path / "registry"), model, optimizer, tmp_path / "init", step=2)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(ckpt.path)], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("TOKENS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    tokens = json.loads(lines[0].removeprefix("TOKENS "))
    assert len(tokens) == 6 and all(0 <= t < model.config.vocab_size for t in tokens)
