"""Padded batches and the student forward that runs the LM head only on answer positions.

A batch of B items is right-padded to S tokens. Right padding needs no attention mask with a causal model: real
tokens never attend to the pads after them, so the fast `is_causal` attention path is used. The hidden state at
position j predicts token j + 1; only the positions whose next token is a target (a teacher completion token or
a reference-answer token) go through the 49k-wide LM head — prompts are masked out of the loss, and skipping
their logits is the biggest saving for a small student (PLATFORM.md: 1,297 → 1,849 tokens/s).
Rows come in three groups: teacher-sample positions of off-policy samples (Nt), then of scored student
completions (No, on-policy), then reference-answer positions (Nr). The first two carry the teacher's top-k.

A student with a restricted output vocabulary (`services.common.outvocab`) trains on its N compact head logits:
the teacher's top-k ids and the targets are mapped onto head rows first (`onto_head`); a top-k entry without a row
becomes padding, so its mass joins the teacher's tail bucket, and a target without a row is masked out of the
cross-entropy terms and counted (`StepLoss.outside_head`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from services.common.outvocab import OutputVocabHead, head_index
from services.trainer.buffer import SAMPLE, SOURCES, Item
from services.trainer.losses import LossInputs, LossWeights, distillation_loss


@dataclass
class Batch:
    input_ids: Tensor  # (B, S) long, right-padded
    positions: Tensor  # (N,) long, flat indices into B*S of the hidden states that predict a target
    targets: Tensor  # (N,) long, the token each position predicts
    n_teacher: int  # the first n_teacher rows come from off-policy teacher samples
    n_student: int  # the next n_student rows from scored student completions (on-policy)
    top_ids: Tensor  # (Nt + No, K) long
    top_logprobs: Tensor  # (Nt + No, K) float, −inf padding
    top_valid: Tensor  # (Nt + No, K) bool
    weights: Tensor  # (N,) float, the item's weight per position
    tokens: int  # real tokens in the batch (prompts included)
    sources: Tensor  # (N,) long, index into buffer.SOURCES of each row's item

    @property
    def targets_count(self) -> int:
        return int(self.positions.shape[0])

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`; on CUDA the host tensors are pinned first so the copies run asynchronously."""
        if device.type == "cpu":
            return self

        def move(t: Tensor) -> Tensor:
            return t.pin_memory().to(device, non_blocking=True)

        return Batch(
            input_ids=move(self.input_ids),
            positions=move(self.positions),
            targets=move(self.targets),
            n_teacher=self.n_teacher,
            n_student=self.n_student,
            top_ids=move(self.top_ids),
            top_logprobs=move(self.top_logprobs),
            top_valid=move(self.top_valid),
            weights=move(self.weights),
            tokens=self.tokens,
            sources=self.sources,  # bookkeeping only: stays on the host
        )


def collate(items: Sequence[Item], pad_id: int) -> Batch:
    """Items → a right-padded batch; shapes in the class docstring."""
    width = max((len(it.input_ids) for it in items), default=1)
    ids = np.full((len(items), width), pad_id, dtype=np.int64)
    for b, it in enumerate(items):
        ids[b, : len(it.input_ids)] = it.input_ids
    teacher = [(b, it) for b, it in enumerate(items) if it.kind == SAMPLE and not it.on_policy]
    student = [(b, it) for b, it in enumerate(items) if it.kind == SAMPLE and it.on_policy]
    reference = [(b, it) for b, it in enumerate(items) if it.kind != SAMPLE]
    k = max((it.top_ids.shape[1] for _, it in teacher + student if it.top_ids is not None), default=1)
    positions: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    sources: list[np.ndarray] = []
    top_ids: list[np.ndarray] = []
    top_lp: list[np.ndarray] = []
    for group in (teacher, student, reference):
        for b, it in group:
            c = it.targets
            # Position j (from prompt_len − 1) predicts token j + 1.
            positions.append(b * width + np.arange(it.prompt_len - 1, it.prompt_len - 1 + c))
            targets.append(np.asarray(it.input_ids[it.prompt_len :], dtype=np.int64))
            weights.append(np.full(c, it.weight, dtype=np.float32))
            sources.append(np.full(c, SOURCES.index(it.source), dtype=np.int64))
            if group is not reference:
                ti = np.zeros((c, k), dtype=np.int64)
                tl = np.full((c, k), -np.inf, dtype=np.float32)
                if it.top_ids is not None and it.top_logprobs is not None:
                    kk = it.top_ids.shape[1]
                    ti[:, :kk] = it.top_ids[:c]
                    tl[:, :kk] = it.top_logprobs[:c]
                top_ids.append(ti)
                top_lp.append(tl)
    n_teacher = sum(it.targets for _, it in teacher)
    n_student = sum(it.targets for _, it in student)

    def cat(parts: list[np.ndarray], dtype: Any, shape: tuple[int, ...]) -> Tensor:
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(shape, dtype=dtype)

    top_logprobs = cat(top_lp, torch.float32, (0, k))
    return Batch(
        input_ids=torch.from_numpy(ids),
        positions=cat(positions, torch.long, (0,)),
        targets=cat(targets, torch.long, (0,)),
        n_teacher=n_teacher,
        n_student=n_student,
        top_ids=cat(top_ids, torch.long, (0, k)),
        top_logprobs=top_logprobs,
        top_valid=torch.isfinite(top_logprobs),
        weights=cat(weights, torch.float32, (0,)),
        tokens=sum(len(it.input_ids) for it in items),
        sources=cat(sources, torch.long, (0,)),
    )


def restricted_head(model: Any) -> OutputVocabHead | None:
    """The model's LM head when it covers a restricted output vocabulary, else None."""
    head = getattr(model, "lm_head", None)
    return head if isinstance(head, OutputVocabHead) else None


def answer_logits(
    model: Any, input_ids: Tensor, positions: Tensor, autocast: bool, body: Any = None, compact: bool = False
) -> Tensor:
    """Student logits at `positions` only: (B, S) ids, (N,) flat positions → (N, V).

    `body` is the decoder to run (e.g. a `torch.compile`d `model.model`); default `model.model`. bf16 autocast
    runs on the device the ids are on (CPU or CUDA). `compact`: a restricted head's N logits, (N, Nh), instead of
    the full vocabulary with −inf where it has no row.
    """
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        decoder = body if body is not None else model.model
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, S, H)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (N, H)
        head = restricted_head(model) if compact else None
        logits: Tensor = head.compact(picked) if head is not None else model.lm_head(picked)  # (N, V) or (N, Nh)
    return logits


@dataclass
class OnHead:
    """A batch's teacher top-k and targets in head rows (see `onto_head`): top-k (Nt + No, K), targets (N,)."""

    top_ids: Tensor
    top_logprobs: Tensor
    top_valid: Tensor
    targets: Tensor
    in_head: Tensor  # (N,) bool: the target has a head row


def onto_head(batch: Batch, token_ids: Tensor, vocab_size: int) -> OnHead:
    """Maps full-vocabulary ids onto the rows of a head over `token_ids`. A valid top-k entry without a row becomes
    padding (log-prob −inf): `teacher_buckets` then counts its mass in the tail, 1 − Σ (top-k ∩ head), and the
    student's tail is everything outside the same ids, so both sides still compare the same k + 1 buckets. A target
    without a row points at row 0 and is flagged, for the cross-entropy terms to mask."""
    index = head_index(token_ids, vocab_size)  # (V,)
    rows = index[batch.top_ids]  # (Nt + No, K)
    valid = batch.top_valid & (rows >= 0)
    targets = index[batch.targets]
    return OnHead(
        top_ids=rows.clamp_min(0),
        top_logprobs=batch.top_logprobs.masked_fill(~valid, float("-inf")),
        top_valid=valid,
        targets=targets.clamp_min(0),
        in_head=targets >= 0,
    )


@dataclass
class StepLoss:
    """One micro-batch's loss (with its graph), its terms, and per signal source the summed per-position loss and
    the number of target tokens (for RunProgress.loss_by_source / tokens_by_source)."""

    loss: Tensor
    parts: dict[str, float]
    source_loss: dict[str, float]
    source_tokens: dict[str, int]
    outside_head: int = 0  # target tokens (every row's) a restricted head has no row for


def batch_loss(
    model: Any,
    batch: Batch,
    weights: LossWeights,
    autocast: bool,
    body: Any = None,
    on_policy: LossWeights | None = None,
    counts: tuple[int, int, int] | None = None,
) -> StepLoss:
    """The run's mixed loss for one (micro-)batch: `weights` on off-policy and reference rows, `on_policy` on
    scored student completions. `counts`: see `distillation_loss` (a rank's share of a data-parallel batch)."""
    logits = answer_logits(model, batch.input_ids, batch.positions, autocast, body, compact=True)
    head = restricted_head(model)
    top_ids, top_logprobs, top_valid, targets = batch.top_ids, batch.top_logprobs, batch.top_valid, batch.targets
    in_head: Tensor | None = None
    outside = 0
    if head is not None:
        mapped = onto_head(batch, head.token_ids, head.vocab_size)
        top_ids, top_logprobs, top_valid, targets = (
            mapped.top_ids,
            mapped.top_logprobs,
            mapped.top_valid,
            mapped.targets,
        )
        in_head = mapped.in_head
        outside = int((~in_head).sum())
    nt, no = batch.n_teacher, batch.n_student
    loss, parts, per_position = distillation_loss(
        weights,
        LossInputs(
            t_logits=logits[:nt],
            top_ids=top_ids[:nt],
            top_logprobs=top_logprobs[:nt],
            top_valid=top_valid[:nt],
            sampled=targets[:nt],
            t_weights=batch.weights[:nt],
            r_logits=logits[nt + no :],
            r_targets=targets[nt + no :],
            r_weights=batch.weights[nt + no :],
            o_logits=logits[nt : nt + no],
            o_top_ids=top_ids[nt : nt + no],
            o_top_logprobs=top_logprobs[nt : nt + no],
            o_top_valid=top_valid[nt : nt + no],
            o_weights=batch.weights[nt : nt + no],
            sampled_in_head=None if in_head is None else in_head[:nt],
            r_in_head=None if in_head is None else in_head[nt + no :],
        ),
        on_policy,
        counts,
    )
    codes = batch.sources.tolist()
    values = per_position.cpu().tolist()
    source_loss: dict[str, float] = {}
    source_tokens: dict[str, int] = {}
    for code, value in zip(codes, values, strict=True):
        name = SOURCES[code]
        source_loss[name] = source_loss.get(name, 0.0) + value
        source_tokens[name] = source_tokens.get(name, 0) + 1
    return StepLoss(loss, parts, source_loss, source_tokens, outside)


def lr_at(step: int, base: float, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_ratio`·base at `max_steps` (constant when max_steps = 0)."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if max_steps <= 0:
        return base
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
