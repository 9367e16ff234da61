"""Run specs: complete them with defaults, validate them (errors name the field and value), JSON round trip."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from services.common import outvocab, pb
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.registry import CheckpointError, Registry, uri_for, verify
from services.tasks import CheckerError, parse_checker
from services.trainer import budget
from services.trainer.losses import LossWeights
from services.trainer.recipes import GATE_METRICS, with_defaults
from services.trainer.student import resolve_shape

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def new_run_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _range(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    # `not low <= value` also refuses NaN, which every comparison answers False; isfinite says so plainly.
    if not math.isfinite(value) or not low <= value <= high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidArgument(field, value, f"must be in {bracket}{low}, {high}]")


def complete(
    spec: pb.trainer.RunSpec,
    teacher_config: dict[str, Any] | None,
    checker_modules: list[str] | None = None,
    registry: Registry | None = None,
    memory_bytes: int | None = None,
) -> pb.trainer.RunSpec:
    """Defaults filled, a run id assigned when empty, and every field validated; raises InvalidArgument (or
    ResourceExhausted when the run would need more than `memory_bytes`). An init_checkpoint must be a checkpoint of
    `registry`; it is rewritten to that checkpoint's URI."""
    full = with_defaults(spec, teacher_config)
    if not full.run_id:
        full.run_id = new_run_id()
    validate(full, teacher_config, checker_modules or [], registry)
    if memory_bytes is not None and teacher_config is not None:
        check_memory(full, teacher_config, memory_bytes)
    return full


def check_memory(spec: pb.trainer.RunSpec, teacher_config: dict[str, Any], memory_bytes: int) -> None:
    """Refuses a run whose estimated peak memory is more than `memory_bytes` (see `budget.run_bytes`)."""
    from transformers import PretrainedConfig

    config = PretrainedConfig.from_dict(teacher_config)
    source = spec.student.WhichOneof("source")
    if source == "init_checkpoint":
        return  # its size is bounded by what this trainer wrote
    want = spec.student.config if source == "config" else spec.student.pruned
    shape = resolve_shape(config, want, field=f"spec.student.{source or 'pruned'}")
    vocab = int(teacher_config.get("vocab_size", 32000))
    # A restricted output vocabulary's N rows are chosen from the run's first samples, after this check: N ≤ the
    # vocabulary bounds both its own (untied) head and the width of the logits the losses see.
    head_rows = vocab if spec.student.output_vocab_coverage > 0 else 0
    student = budget.parameters(teacher_config, shape.num_layers, shape.hidden_size, shape.intermediate_size,
                                shape.num_attention_heads, shape.num_key_value_heads, head_rows)  # fmt: skip
    teacher = budget.parameters(teacher_config, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                                config.num_attention_heads, config.num_key_value_heads)  # fmt: skip
    s = spec.schedule
    need = budget.run_bytes(student, teacher, head_rows or vocab, s.batch_size, s.max_seq_len)
    if need > memory_bytes:
        raise ResourceExhausted(
            f"spec: this run needs about {need / 2**30:.1f} GiB (student {student:,} parameters, batch_size "
            f"{s.batch_size} x max_seq_len {s.max_seq_len}); the trainer may use {memory_bytes / 2**30:.1f} GiB "
            "(run_memory_fraction of the machine's memory): use a smaller student or batch"
        )


def _validate_loss(loss: pb.trainer.LossSpec, where: str) -> None:
    weights = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "cross_entropy", "reference_ce")
    for name in weights:
        _range(f"{where}.{name}", getattr(loss, name), 0.0, 1000.0)
    _range(f"{where}.jsd_beta", loss.jsd_beta, 0.0, 1.0)
    _range(f"{where}.skew_alpha", loss.skew_alpha, 0.0, 1.0)
    _range(f"{where}.temperature", loss.temperature, 0.0, 100.0, low_open=True)


def _validate_on_policy(spec: pb.trainer.RunSpec) -> None:
    o = spec.on_policy
    _range("spec.on_policy.fraction", o.fraction, 0.0, 1.0)
    _range("spec.on_policy.refresh_every_steps", o.refresh_every_steps, 1, 1_000_000)
    _range("spec.on_policy.prompts_per_refresh", o.prompts_per_refresh, 1, 100_000)
    _range("spec.on_policy.max_new_tokens", o.max_new_tokens, 1, 4096)
    _range("spec.on_policy.temperature", o.temperature, 0.0, 10.0)
    _range("spec.on_policy.max_staleness_steps", o.max_staleness_steps, 0, 100_000_000)
    _validate_loss(o.loss, "spec.on_policy.loss")
    cross_entropy = ("cross_entropy", "reference_ce")
    for name in cross_entropy:
        if getattr(o.loss, name) > 0:
            # Cross-entropy on the student's own tokens would reinforce whatever it sampled, right or wrong.
            raise InvalidArgument(f"spec.on_policy.loss.{name}", getattr(o.loss, name),
                                  "on-policy samples are the student's own text: use KL terms only")  # fmt: skip
    if o.fraction > 0 and not any(getattr(o.loss, w) > 0 for w in ("forward_kl", "reverse_kl", "jsd", "skew_kl")):
        raise InvalidArgument("spec.on_policy.loss", "all zero", "give a KL-family weight (e.g. reverse_kl: 1)")


def validate(
    spec: pb.trainer.RunSpec,
    teacher_config: dict[str, Any] | None,
    checker_modules: list[str],
    registry: Registry | None = None,
) -> None:
    """Checks a spec that `with_defaults` completed. `teacher_config` (config.json) checks pruned shapes;
    `checker_modules` are the modules a python: checker may come from (the trainer's setting)."""
    if not RUN_ID_RE.match(spec.run_id):
        raise InvalidArgument("spec.run_id", spec.run_id, "use 1-64 letters, digits, '.', '_' or '-'")
    if len(spec.task) > 200:
        raise InvalidArgument("spec.task", spec.task, "a label of at most 200 characters")
    if spec.checker:
        try:
            parse_checker(spec.checker, checker_modules)
        except CheckerError as exc:
            raise InvalidArgument("spec.checker", spec.checker, str(exc).split(": ", 1)[-1]) from None
    _validate_student(spec.student, teacher_config, registry)
    _validate_loss(spec.loss, "spec.loss")
    _validate_on_policy(spec)

    s = spec.schedule
    _range("spec.schedule.learning_rate", s.learning_rate, 0.0, 1.0, low_open=True)
    _range("spec.schedule.warmup_steps", s.warmup_steps, 0, 1_000_000)
    _range("spec.schedule.max_steps", s.max_steps, 0, 100_000_000)
    _range("spec.schedule.batch_size", s.batch_size, 1, 4096)
    _range("spec.schedule.grad_accum_steps", s.grad_accum_steps, 1, 1024)
    _range("spec.schedule.max_grad_norm", s.max_grad_norm, 0.0, 1e6, low_open=True)
    _range("spec.schedule.weight_decay", s.weight_decay, 0.0, 10.0)
    _range("spec.schedule.eval_every_steps", s.eval_every_steps, 1, 100_000_000)
    _range("spec.schedule.max_seq_len", s.max_seq_len, 8, 32768)
    _range("spec.schedule.replay_buffer_size", s.replay_buffer_size, s.batch_size, 10_000_000)
    _range("spec.schedule.sample_reuse", s.sample_reuse, 1, 1000)
    _range("spec.schedule.min_lr_ratio", s.min_lr_ratio, 0.0, 1.0)
    if teacher_config and s.max_seq_len > teacher_config.get("max_position_embeddings", s.max_seq_len):
        raise InvalidArgument(
            "spec.schedule.max_seq_len", s.max_seq_len, "longer than the model's max_position_embeddings"
        )

    _range("spec.data.incorrect_weight", spec.data.incorrect_weight, 0.0, 1.0)
    if spec.data.verify not in pb.trainer.VerifyMode.values():
        raise InvalidArgument("spec.data.verify", spec.data.verify, "unknown verify mode")

    _range("spec.gate.min_accuracy_ratio", spec.gate.min_accuracy_ratio, 0.0, 100.0)
    _range("spec.gate.min_accuracy", spec.gate.min_accuracy, 0.0, 1.0)
    if spec.gate.metric and spec.gate.metric not in GATE_METRICS:
        raise InvalidArgument("spec.gate.metric", spec.gate.metric, f"must be one of {', '.join(GATE_METRICS)}")
    if spec.gate.metric == "accuracy" and not spec.checker:
        raise InvalidArgument("spec.gate.metric", "accuracy", "needs a checker (spec.checker); or gate on "
                              "teacher_agreement")  # fmt: skip
    if spec.gate.HasField("min_score"):
        _range("spec.gate.min_score", spec.gate.min_score, 0.0, 1e6)
    _range("spec.eval.max_prompts", spec.eval.max_prompts, 0, 100_000)
    _range("spec.eval.max_new_tokens", spec.eval.max_new_tokens, 1, 4096)
    _range("spec.eval.max_agreement_samples", spec.eval.max_agreement_samples, 0, 100_000)
    _range("spec.eval.min_eval_samples", spec.eval.min_eval_samples, 0, 100_000)


def _validate_student(
    recipe: pb.trainer.StudentRecipe, teacher_config: dict[str, Any] | None, registry: Registry | None
) -> None:
    source = recipe.WhichOneof("source")
    _range("spec.student.output_vocab_coverage", recipe.output_vocab_coverage, 0.0, 1.0)
    if source == "init_checkpoint":
        # A caller names a checkpoint this trainer's registry holds, never a path elsewhere on the machine.
        field = "spec.student.init_checkpoint"
        if registry is None:
            raise InvalidArgument(field, recipe.init_checkpoint, "this trainer has no registry to continue from")
        try:
            path = verify(registry.locate(recipe.init_checkpoint, field)).path
        except CheckpointError as exc:
            raise InvalidArgument(field, recipe.init_checkpoint, str(exc).split(": ", 1)[-1]) from exc
        recipe.init_checkpoint = uri_for(path)
        _check_output_vocab(recipe, json.loads((path / "config.json").read_text()))
        return
    if teacher_config is not None:
        _check_output_vocab(recipe, teacher_config)
    if source == "pruned" and recipe.pruned.layer_selection not in pb.trainer.LayerSelection.values():
        raise InvalidArgument("spec.student.pruned.layer_selection", recipe.pruned.layer_selection,
                              f"must be one of {list(pb.trainer.LayerSelection.keys())}")  # fmt: skip
    if teacher_config is None:
        return
    from transformers import PretrainedConfig

    config = PretrainedConfig.from_dict(teacher_config)
    if source == "config":
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            _range(f"spec.student.config.{name}", getattr(recipe.config, name), 1, 65536)
        resolve_shape(config, recipe.config, field="spec.student.config")
    else:
        resolve_shape(config, recipe.pruned, field="spec.student.pruned")


def _check_output_vocab(recipe: pb.trainer.StudentRecipe, config: dict[str, Any]) -> None:
    """A restricted output vocabulary only for a student of a family that has one (Llama)."""
    if recipe.output_vocab_coverage > 0:
        try:
            outvocab.check_supported(config)
        except outvocab.OutputVocabError as exc:
            raise InvalidArgument(
                "spec.student.output_vocab_coverage", recipe.output_vocab_coverage, str(exc)
            ) from None


def loss_weights(spec: pb.trainer.RunSpec, on_policy: bool = False) -> LossWeights:
    """The loss mix of the run's samples, or (`on_policy`) of its scored student completions."""
    loss = spec.on_policy.loss if on_policy else spec.loss
    return LossWeights(
        forward_kl=loss.forward_kl,
        reverse_kl=loss.reverse_kl,
        jsd=loss.jsd,
        skew_kl=loss.skew_kl,
        cross_entropy=loss.cross_entropy,
        reference_ce=loss.reference_ce,
        jsd_beta=loss.jsd_beta,
        skew_alpha=loss.skew_alpha,
        temperature=loss.temperature,
    )


def to_json(spec: pb.trainer.RunSpec) -> dict[str, Any]:
    return json_format.MessageToDict(spec, preserving_proto_field_name=True)


def from_json(data: dict[str, Any]) -> pb.trainer.RunSpec:
    return json_format.ParseDict(data, pb.trainer.RunSpec())


def teacher_config_of(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return data
