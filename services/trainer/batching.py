"""Padded batches and the student forward that runs the LM head only on answer positions.

A batch of B items is right-padded to S tokens. Right padding needs no attention mask with a causal model: real
tokens never attend to the pads after them, so the fast `is_causal` attention path is used. The hidden state at
position j predicts token j + 1; only the positions whose next token is a target (a teacher completion token or
a reference-answer token) go through the 49k-wide LM head — prompts are masked out of the loss, and skipping
their logits is the biggest saving for a small student (PLATFORM.md: 1,297 → 1,849 tokens/s).
Teacher-item positions come first (Nt rows), reference-item positions after them (Nr rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from services.trainer.buffer import SAMPLE, Item
from services.trainer.losses import LossInputs, LossWeights, distillation_loss


@dataclass
class Batch:
    input_ids: Tensor  # (B, S) long, right-padded
    positions: Tensor  # (N,) long, flat indices into B*S of the hidden states that predict a target
    targets: Tensor  # (N,) long, the token each position predicts
    n_teacher: int  # the first n_teacher rows come from teacher items
    top_ids: Tensor  # (Nt, K) long
    top_logprobs: Tensor  # (Nt, K) float, −inf padding
    top_valid: Tensor  # (Nt, K) bool
    weights: Tensor  # (N,) float, the item's weight per position
    tokens: int  # real tokens in the batch (prompts included)

    @property
    def targets_count(self) -> int:
        return int(self.positions.shape[0])


def collate(items: Sequence[Item], pad_id: int) -> Batch:
    """Items → a right-padded batch; shapes in the class docstring."""
    width = max((len(it.input_ids) for it in items), default=1)
    ids = np.full((len(items), width), pad_id, dtype=np.int64)
    for b, it in enumerate(items):
        ids[b, : len(it.input_ids)] = it.input_ids
    teacher = [(b, it) for b, it in enumerate(items) if it.kind == SAMPLE]
    reference = [(b, it) for b, it in enumerate(items) if it.kind != SAMPLE]
    k = max((it.top_ids.shape[1] for _, it in teacher if it.top_ids is not None), default=1)
    positions: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    top_ids: list[np.ndarray] = []
    top_lp: list[np.ndarray] = []
    for group in (teacher, reference):
        for b, it in group:
            c = it.targets
            # Position j (from prompt_len − 1) predicts token j + 1.
            positions.append(b * width + np.arange(it.prompt_len - 1, it.prompt_len - 1 + c))
            targets.append(np.asarray(it.input_ids[it.prompt_len :], dtype=np.int64))
            weights.append(np.full(c, it.weight, dtype=np.float32))
            if group is teacher:
                ti = np.zeros((c, k), dtype=np.int64)
                tl = np.full((c, k), -np.inf, dtype=np.float32)
                if it.top_ids is not None and it.top_logprobs is not None:
                    kk = it.top_ids.shape[1]
                    ti[:, :kk] = it.top_ids[:c]
                    tl[:, :kk] = it.top_logprobs[:c]
                top_ids.append(ti)
                top_lp.append(tl)
    n_teacher = sum(it.targets for _, it in teacher)

    def cat(parts: list[np.ndarray], dtype: Any, shape: tuple[int, ...]) -> Tensor:
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(shape, dtype=dtype)

    top_logprobs = cat(top_lp, torch.float32, (0, k))
    return Batch(
        input_ids=torch.from_numpy(ids),
        positions=cat(positions, torch.long, (0,)),
        targets=cat(targets, torch.long, (0,)),
        n_teacher=n_teacher,
        top_ids=cat(top_ids, torch.long, (0, k)),
        top_logprobs=top_logprobs,
        top_valid=torch.isfinite(top_logprobs),
        weights=cat(weights, torch.float32, (0,)),
        tokens=sum(len(it.input_ids) for it in items),
    )


def answer_logits(model: Any, input_ids: Tensor, positions: Tensor, autocast: bool, body: Any = None) -> Tensor:
    """Student logits at `positions` only: (B, S) ids, (N,) flat positions → (N, V).

    `body` is the decoder to run (e.g. a `torch.compile`d `model.model`); default `model.model`.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        decoder = body if body is not None else model.model
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, S, H)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (N, H)
        logits: Tensor = model.lm_head(picked)  # (N, V)
    return logits


def batch_loss(
    model: Any, batch: Batch, weights: LossWeights, autocast: bool, body: Any = None
) -> tuple[Tensor, dict[str, float]]:
    """The run's mixed loss for one (micro-)batch."""
    logits = answer_logits(model, batch.input_ids, batch.positions, autocast, body)
    nt = batch.n_teacher
    return distillation_loss(
        weights,
        LossInputs(
            t_logits=logits[:nt],
            top_ids=batch.top_ids,
            top_logprobs=batch.top_logprobs,
            top_valid=batch.top_valid,
            sampled=batch.targets[:nt],
            t_weights=batch.weights[:nt],
            r_logits=logits[nt:],
            r_targets=batch.targets[nt:],
            r_weights=batch.weights[nt:],
        ),
    )


def lr_at(step: int, base: float, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_ratio`·base at `max_steps` (constant when max_steps = 0)."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if max_steps <= 0:
        return base
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
