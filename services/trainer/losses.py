"""Distillation losses on the teacher's top-k log-probs, with the remaining probability mass as a tail bucket.

The teacher stream carries, per completion position, the teacher's k most likely token ids and their log-probs
(from its raw distribution). Both distributions are compared on k + 1 buckets: the k teacher ids and "everything
else" (tail). For the teacher the tail is 1 − Σ top-k; for the student it is 1 − Σ q(top-k ids) under its full
softmax. This keeps every divergence a proper divergence between two distributions without storing the teacher's
full 49k-wide distribution (top-20 holds ≈97% of SmolLM2's mass on word problems, PLATFORM.md).

Shapes: N answer positions, K top-k width (padded entries have teacher log-prob −inf), V vocabulary.
Every loss returns per-position values (N,); `weighted_mean` reduces them (an all-masked batch gives 0, not NaN).

- forward KL(p‖q) — Hinton et al. 2015; word-level KD (Kim & Rush 2016).
- reverse KL(q‖p) — MiniLLM (Gu et al. 2024, arXiv:2306.08543).
- generalized JSD(β) — GKD (Agarwal et al. 2024, arXiv:2306.13649, eq. 1), TRL's convention: mixture
  m = β·p + (1−β)·q, JSD = β·KL(p‖m) + (1−β)·KL(q‖m); β = 0 is forward KL and β = 1 reverse KL, as in TRL.
- skew KL(α) — DistiLLM (Ko et al. 2024, arXiv:2402.03898): KL(p ‖ α·p + (1−α)·q); α = 0 is forward KL.
- cross-entropy on given tokens — sequence-level KD on the teacher's sampled tokens (Kim & Rush 2016), and SFT on
  a reference answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: Floor of a bucket's probability: keeps reverse KL finite when the teacher's top-k hold (almost) all its mass.
MIN_PROB = 1e-8
#: Log-prob of an empty (padded) bucket. Finite on purpose: exp() of it is exactly 0 in float32, and unlike −inf it
#: keeps logaddexp's gradient finite (−inf − −inf = nan would poison the backward pass of the JSD mixture).
EMPTY = -1e4
COMPONENTS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "cross_entropy", "reference_ce")
#: Terms on scored student completions (on-policy), reported apart from the same terms on other samples.
ON_POLICY_COMPONENTS = tuple(f"on_policy_{name}" for name in ("forward_kl", "reverse_kl", "jsd", "skew_kl"))


def teacher_buckets(top_logprobs: Tensor) -> Tensor:
    """(N, K) teacher top-k log-probs (−inf = padding) → (N, K + 1) bucket log-probs, tail last."""
    top = top_logprobs.float().clamp_min(EMPTY)
    mass = top.exp().sum(-1)  # (N,)  exp(EMPTY) = 0 for padding
    tail = torch.log((1.0 - mass).clamp_min(MIN_PROB))
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)


class _LogProbsAt(torch.autograd.Function):
    """log softmax(z / T) at given ids, without materialising the (N, V) float32 log-softmax.

    Forward: a float32 log-sum-exp per row, computed in row chunks that stay in cache, then a gather.
    Backward: ∂ log q_{n,k} / ∂ z_{n,v} = (1[v = id_{n,k}] − q_{n,v}) / T, so the gradient of the logits is
    (scatter(g) − Σ_k g_{n,k} · q_n) / T, again chunk by chunk, written straight in the logits' dtype. Compared
    with log_softmax + gather under autograd this avoids ~8 full (N, V) float32 passes, the largest cost of a
    step after the LM head matmul for a 49k vocabulary (profiled: ≈1.8 s of 7.7 s per step).
    """

    CHUNK = 16  # rows: 16 × 49152 float32 = 3 MB

    @staticmethod
    def forward(ctx: Any, logits: Tensor, ids: Tensor, inv_t: float) -> Tensor:  # (N, V), (N, K) → (N, K)
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, _LogProbsAt.CHUNK):
            lse[s : s + _LogProbsAt.CHUNK] = torch.logsumexp(logits[s : s + _LogProbsAt.CHUNK].float() * inv_t, -1)
        out = logits.gather(-1, ids).float() * inv_t - lse[:, None]
        ctx.save_for_backward(logits, ids, lse)
        ctx.inv_t = inv_t
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # (N, K) → (N, V)
        logits, ids, lse = ctx.saved_tensors
        inv_t = ctx.inv_t
        out = torch.empty_like(logits)
        gsum = grad.sum(-1)
        for s in range(0, logits.shape[0], _LogProbsAt.CHUNK):
            e = s + _LogProbsAt.CHUNK
            q = torch.exp(logits[s:e].float() * inv_t - lse[s:e, None])  # (c, V)
            q.mul_(-gsum[s:e, None]).scatter_add_(-1, ids[s:e], grad[s:e].float())
            out[s:e] = q.mul_(inv_t)
        return out, None, None


def log_probs_at(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) gathered at `ids`: (N, V), (N, K) → (N, K), float32; memory-lean backward."""
    if logits.shape[0] == 0:
        return logits.new_zeros(ids.shape, dtype=torch.float32) + logits.sum() * 0
    out: Tensor = _LogProbsAt.apply(logits, ids, 1.0 / temperature)
    return out


def student_buckets(logits: Tensor, top_ids: Tensor, valid: Tensor, temperature: float = 1.0) -> Tensor:
    """Student logits (N, V) at the teacher's ids (N, K) → (N, K + 1) bucket log-probs, tail last.

    `valid` (N, K) is False for padded top-k entries; they get EMPTY so they carry no mass on either side.
    The log-softmax is taken in float32 even under bf16 autocast (a 49k-way softmax loses too much in bf16).
    """
    top = log_probs_at(logits, top_ids, temperature).masked_fill(~valid, EMPTY)  # (N, K)
    mass = top.exp().sum(-1)
    # 1 − Σ can round below zero when the top-k hold nearly all mass; the floor keeps log finite.
    tail = torch.log((1.0 - mass).clamp_min(MIN_PROB))
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)


def kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p‖q) per row over the last dim, (N, B) × (N, B) → (N,); buckets with p = 0 contribute 0."""
    p = p_log.exp()
    # 0 · log(0 / q) is defined as 0: empty buckets contribute nothing, whatever q is there.
    diff = torch.where(p > 0, p_log - q_log.clamp_min(EMPTY), torch.zeros_like(p_log))
    return (p * diff).sum(-1)


def forward_kl(t_log: Tensor, s_log: Tensor) -> Tensor:
    """KL(teacher‖student): mass-covering. (N, B) → (N,)."""
    return kl(t_log, s_log)


def reverse_kl(t_log: Tensor, s_log: Tensor) -> Tensor:
    """KL(student‖teacher): mode-seeking. (N, B) → (N,)."""
    return kl(s_log, t_log)


def _mix(a_log: Tensor, b_log: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b) per bucket, computed in log space."""
    return torch.logaddexp(a_log + math.log(w), b_log + math.log1p(-w))


def generalized_jsd(t_log: Tensor, s_log: Tensor, beta: float) -> Tensor:
    """β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q (GKD eq. 1, TRL's convention). (N, B) → (N,)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"loss.jsd_beta={beta}: must be in [0, 1]")
    if beta == 0.0:
        return forward_kl(t_log, s_log)
    if beta == 1.0:
        return reverse_kl(t_log, s_log)
    m_log = _mix(t_log, s_log, beta)
    return beta * kl(t_log, m_log) + (1.0 - beta) * kl(s_log, m_log)


def skew_kl(t_log: Tensor, s_log: Tensor, alpha: float) -> Tensor:
    """KL(p ‖ α·p + (1−α)·q) (DistiLLM skew KL). (N, B) → (N,)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"loss.skew_alpha={alpha}: must be in [0, 1]")
    if alpha == 0.0:
        return forward_kl(t_log, s_log)
    if alpha == 1.0:
        return torch.zeros(t_log.shape[0], device=t_log.device)
    return kl(t_log, _mix(t_log, s_log, alpha))


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """−log q(target) per position, logits (N, V), targets (N,) → (N,); float32 log-softmax."""
    return -log_probs_at(logits, targets[:, None])[:, 0]


def weighted_mean(values: Tensor, weights: Tensor, count: int | None = None) -> Tensor:
    """Σ w·v / N over N positions; 0 (with a gradient path) when N = 0. `count` replaces N when these positions
    are one rank's share of a data-parallel batch of `count` positions: the ranks' values then sum to the mean."""
    return (values * weights).sum() / max(values.shape[0] if count is None else count, 1)


@dataclass(frozen=True)
class LossWeights:
    """The run spec's mix: each term's weight, plus the JSD β, skew α and student temperature."""

    forward_kl: float = 1.0
    reverse_kl: float = 0.0
    jsd: float = 0.0
    skew_kl: float = 0.0
    cross_entropy: float = 0.0
    reference_ce: float = 0.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    temperature: float = 1.0

    def uses_teacher_distribution(self) -> bool:
        return any(w > 0 for w in (self.forward_kl, self.reverse_kl, self.jsd, self.skew_kl))


@dataclass
class LossInputs:
    """Everything the mixed loss needs for one micro-batch, already gathered at answer positions.

    Off-policy teacher-sample positions (Nt): `t_logits` (Nt, V), `top_ids` / `top_logprobs` (Nt, K), `top_valid`
    (Nt, K), `sampled` (Nt,) the sample's token, `t_weights` (Nt,). Reference-answer positions (Nr): `r_logits`
    (Nr, V), `r_targets` (Nr,), `r_weights` (Nr,). Scored student completions (No, on-policy): `o_logits` (No, V),
    `o_top_ids` / `o_top_logprobs` / `o_top_valid` (No, K), `o_weights` (No,); empty by default. With a restricted
    output vocabulary V is its N head rows and every id is a head row (`batching.onto_head`).
    """

    t_logits: Tensor
    top_ids: Tensor
    top_logprobs: Tensor
    top_valid: Tensor
    sampled: Tensor
    t_weights: Tensor
    r_logits: Tensor
    r_targets: Tensor
    r_weights: Tensor
    o_logits: Tensor | None = None
    o_top_ids: Tensor | None = None
    o_top_logprobs: Tensor | None = None
    o_top_valid: Tensor | None = None
    o_weights: Tensor | None = None
    #: A restricted output vocabulary: whether each target has a head row, (Nt,) and (Nr,) bool. A target without
    #: one contributes 0 to its cross-entropy term (it still counts in the term's mean: see `distillation_loss`).
    sampled_in_head: Tensor | None = None
    r_in_head: Tensor | None = None


def _divergences(
    w: LossWeights, logits: Tensor, top_ids: Tensor, top_logprobs: Tensor, valid: Tensor
) -> dict[str, Tensor]:
    """Per-position values (N,) of the KL-family terms `w` enables, on the teacher's top-k + tail buckets."""
    out: dict[str, Tensor] = {}
    if not w.uses_teacher_distribution() or logits.shape[0] == 0:
        return out
    t_log = teacher_buckets(top_logprobs)
    s_log = student_buckets(logits, top_ids, valid, w.temperature)
    if w.forward_kl > 0:
        out["forward_kl"] = forward_kl(t_log, s_log)
    if w.reverse_kl > 0:
        out["reverse_kl"] = reverse_kl(t_log, s_log)
    if w.jsd > 0:
        out["jsd"] = generalized_jsd(t_log, s_log, w.jsd_beta)
    if w.skew_kl > 0:
        out["skew_kl"] = skew_kl(t_log, s_log, w.skew_alpha)
    return out


def _masked(values: Tensor, keep: Tensor | None) -> Tensor:
    """`values` (N,) with 0 where `keep` (N,) is False: a target the student has no output row for has no
    log-probability to raise. Kept in the mean's count, so the ranks of a data-parallel batch need no extra count."""
    return values if keep is None else values.masked_fill(~keep, 0.0)


def distillation_loss(
    w: LossWeights, x: LossInputs, on_policy: LossWeights | None = None, counts: tuple[int, int, int] | None = None
) -> tuple[Tensor, dict[str, float], Tensor]:
    """The weighted sum of the enabled terms, each term's value (unweighted) for metrics, and the loss of every
    position (N,) = (Nt + No + Nr,), detached, in row order: what `batch_loss` splits by signal source.

    Each term is a mean over its own positions, so the off-policy, on-policy and reference terms keep their scale
    whatever the mix of sample kinds in a batch. `on_policy` (default: `w`) weighs the scored student completions.
    `counts` (Nt, No, Nr) of the whole data-parallel batch, when `x` is one rank's share of it: each term is then
    divided by the batch's count instead of this share's, so the ranks' losses (and gradients) sum to the loss of
    the whole batch on one rank.
    """
    on_policy = on_policy or w
    values: dict[str, Tensor] = {}  # term → per-position values (unweighted)
    values.update(_divergences(w, x.t_logits, x.top_ids, x.top_logprobs, x.top_valid))
    if w.cross_entropy > 0 and x.t_logits.shape[0] > 0:
        values["cross_entropy"] = _masked(token_cross_entropy(x.t_logits, x.sampled), x.sampled_in_head)
    if w.reference_ce > 0 and x.r_logits.shape[0] > 0:
        values["reference_ce"] = _masked(token_cross_entropy(x.r_logits, x.r_targets), x.r_in_head)
    o_logits = x.o_logits if x.o_logits is not None else x.t_logits[:0]
    if o_logits.shape[0] > 0:
        assert x.o_top_ids is not None and x.o_top_logprobs is not None and x.o_top_valid is not None
        found = _divergences(on_policy, o_logits, x.o_top_ids, x.o_top_logprobs, x.o_top_valid)
        values.update({f"on_policy_{name}": v for name, v in found.items()})
    o_weights = x.o_weights if x.o_weights is not None else x.t_weights[:0]
    row_weights = {"reference_ce": x.r_weights}
    # Zero with a graph to the logits, so an all-masked micro-batch still backpropagates (zeros) cleanly.
    total = x.t_logits.sum() * 0.0 + x.r_logits.sum() * 0.0 + o_logits.sum() * 0.0
    per_t = torch.zeros(x.t_logits.shape[0], device=x.t_logits.device)
    per_o = torch.zeros(o_logits.shape[0], device=x.t_logits.device)
    per_r = torch.zeros(x.r_logits.shape[0], device=x.t_logits.device)
    parts: dict[str, float] = {}
    for name, value in values.items():
        if name.startswith("on_policy_"):
            weight, rows, per = getattr(on_policy, name.removeprefix("on_policy_")), o_weights, per_o
            group = 1
        else:
            weight, rows, per = getattr(w, name), row_weights.get(name, x.t_weights), per_t
            per = per_r if name == "reference_ce" else per
            group = 2 if name == "reference_ce" else 0
        term = weighted_mean(value, rows, None if counts is None else counts[group])
        total = total + weight * term
        per += weight * (value * rows).detach()
        parts[name] = float(term.detach())
    return total, parts, torch.cat([per_t, per_o, per_r])
