"""Known values of each distillation loss, computed by hand on a 4-token vocabulary.

Setup used by most tests: student logits [0, 0, 0, 0] → q = 0.25 each. Teacher top-2 ids [0, 1] with
p = [0.5, 0.3] → teacher tail 0.2; the student's tail (ids 2, 3) is 0.5. Buckets: p = [0.5, 0.3, 0.2],
q = [0.25, 0.25, 0.5].
"""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer import losses as L

LN = math.log
# KL(p‖q) = .5 ln(.5/.25) + .3 ln(.3/.25) + .2 ln(.2/.5) = .346574 + .054696 − .183258
FORWARD = 0.5 * LN(2) + 0.3 * LN(1.2) + 0.2 * LN(0.4)
# KL(q‖p) = .25 ln(.25/.5) + .25 ln(.25/.3) + .5 ln(.5/.2) = −.173287 − .045580 + .458145
REVERSE = 0.25 * LN(0.5) + 0.25 * LN(0.25 / 0.3) + 0.5 * LN(2.5)
# β = .5: m = [.375, .275, .35]; .5·KL(p‖m) + .5·KL(q‖m) = .5·(.058021 + .053144)
M = [0.375, 0.275, 0.35]
JSD = 0.5 * (0.5 * LN(0.5 / M[0]) + 0.3 * LN(0.3 / M[1]) + 0.2 * LN(0.2 / M[2])) + 0.5 * (
    0.25 * LN(0.25 / M[0]) + 0.25 * LN(0.25 / M[1]) + 0.5 * LN(0.5 / M[2])
)
# α = .1: m = .1·p + .9·q = [.275, .255, .47]
SKEW = 0.5 * LN(0.5 / 0.275) + 0.3 * LN(0.3 / 0.255) + 0.2 * LN(0.2 / 0.47)


def _buckets(k: int = 2, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.zeros(1, 4, requires_grad=True)
    ids = torch.tensor([[0, 1][:k] + [0] * pad])
    lp = torch.tensor([[LN(0.5), LN(0.3)][:k] + [-math.inf] * pad])
    valid = torch.isfinite(lp)
    return logits, L.teacher_buckets(lp), L.student_buckets(logits, ids, valid)


def test_hand_computed_values() -> None:
    assert pytest.approx((0.218012, 0.239278, 0.055582, 0.176791), abs=1e-6) == (FORWARD, REVERSE, JSD, SKEW)
    _, t, s = _buckets()
    torch.testing.assert_close(t.exp(), torch.tensor([[0.5, 0.3, 0.2]]))
    torch.testing.assert_close(s.exp(), torch.tensor([[0.25, 0.25, 0.5]]))
    assert L.forward_kl(t, s).item() == pytest.approx(FORWARD, abs=1e-6)
    assert L.reverse_kl(t, s).item() == pytest.approx(REVERSE, abs=1e-6)
    assert L.generalized_jsd(t, s, 0.5).item() == pytest.approx(JSD, abs=1e-6)
    assert L.skew_kl(t, s, 0.1).item() == pytest.approx(SKEW, abs=1e-6)


def test_jsd_and_skew_limits_follow_their_papers() -> None:
    _, t, s = _buckets()
    assert L.generalized_jsd(t, s, 0.0).item() == pytest.approx(FORWARD, abs=1e-6)  # TRL: β=0 → KL(p‖q)
    assert L.generalized_jsd(t, s, 1.0).item() == pytest.approx(REVERSE, abs=1e-6)  # β=1 → KL(q‖p)
    assert L.skew_kl(t, s, 0.0).item() == pytest.approx(FORWARD, abs=1e-6)
    assert L.skew_kl(t, s, 1.0).item() == 0.0
    with pytest.raises(ValueError, match="jsd_beta"):
        L.generalized_jsd(t, s, 1.5)
    with pytest.raises(ValueError, match="skew_alpha"):
        L.skew_kl(t, s, -0.1)


def test_k_equals_one() -> None:
    # p = [.5 | tail .5], q = [.25 | tail .75]: .5 ln 2 + .5 ln(2/3) = .143841
    _, t, s = _buckets(k=1)
    assert L.forward_kl(t, s).item() == pytest.approx(0.5 * LN(2) + 0.5 * LN(0.5 / 0.75), abs=1e-6)


def test_padded_top_k_entries_change_nothing_and_keep_gradients_finite() -> None:
    logits, t, s = _buckets(pad=2)
    assert L.forward_kl(t, s).item() == pytest.approx(FORWARD, abs=1e-6)
    loss = L.generalized_jsd(t, s, 0.5).sum() + L.reverse_kl(t, s).sum() + L.skew_kl(t, s, 0.1).sum()
    assert loss.item() == pytest.approx(JSD + REVERSE + SKEW, abs=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_temperature_divides_student_logits() -> None:
    ids, valid = torch.tensor([[0]]), torch.tensor([[True]])
    hot = L.student_buckets(torch.tensor([[2.0, 0, 0, 0]]), ids, valid, temperature=2.0)
    # softmax([1, 0, 0, 0]): e / (e + 3) = .475367
    assert hot[0, 0].exp().item() == pytest.approx(math.e / (math.e + 3), abs=1e-6)


def test_cross_entropy_and_weighting() -> None:
    logits = torch.zeros(2, 4)
    ce = L.token_cross_entropy(logits, torch.tensor([2, 3]))
    torch.testing.assert_close(ce, torch.full((2,), LN(4)))  # −ln .25 = 1.386294
    assert L.weighted_mean(ce, torch.tensor([1.0, 0.25])).item() == pytest.approx(1.25 * LN(4) / 2, abs=1e-6)


def _inputs(nt: int, nr: int) -> L.LossInputs:
    return L.LossInputs(
        t_logits=torch.zeros(nt, 4, requires_grad=True),
        top_ids=torch.tensor([[0, 1]] * nt, dtype=torch.long).view(nt, 2),
        top_logprobs=torch.tensor([[LN(0.5), LN(0.3)]] * nt).view(nt, 2),
        top_valid=torch.ones(nt, 2, dtype=torch.bool),
        sampled=torch.full((nt,), 2, dtype=torch.long),
        t_weights=torch.ones(nt),
        r_logits=torch.zeros(nr, 4, requires_grad=True),
        r_targets=torch.full((nr,), 1, dtype=torch.long),
        r_weights=torch.ones(nr),
    )


def test_weighted_mix_of_every_term() -> None:
    w = L.LossWeights(
        forward_kl=1.0, reverse_kl=0.5, jsd=2.0, skew_kl=0.25, cross_entropy=0.1, reference_ce=3.0, jsd_beta=0.5
    )
    total, parts, per_position = L.distillation_loss(w, _inputs(3, 2))
    assert parts == pytest.approx(
        {"forward_kl": FORWARD, "reverse_kl": REVERSE, "jsd": JSD, "skew_kl": SKEW, "cross_entropy": LN(4),
         "reference_ce": LN(4)}, abs=1e-6,
    )  # fmt: skip
    expected = FORWARD + 0.5 * REVERSE + 2 * JSD + 0.25 * SKEW + 0.1 * LN(4) + 3 * LN(4)
    assert total.item() == pytest.approx(expected, abs=1e-5)
    # Per position: the teacher rows carry every teacher term, the reference rows the reference term.
    teacher_row = FORWARD + 0.5 * REVERSE + 2 * JSD + 0.25 * SKEW + 0.1 * LN(4)
    assert per_position.tolist() == pytest.approx([teacher_row] * 3 + [3 * LN(4)] * 2, abs=1e-5)


def test_on_policy_rows_take_their_own_loss() -> None:
    """Scored student completions are weighed by the on-policy mix (reverse KL), apart from the other samples."""
    x = _inputs(3, 0)
    on = _inputs(2, 0)
    x.o_logits, x.o_top_ids, x.o_top_logprobs = on.t_logits, on.top_ids, on.top_logprobs
    x.o_top_valid, x.o_weights = on.top_valid, on.t_weights
    total, parts, per_position = L.distillation_loss(
        L.LossWeights(forward_kl=1.0), x, on_policy=L.LossWeights(forward_kl=0.0, reverse_kl=2.0)
    )
    assert parts == pytest.approx({"forward_kl": FORWARD, "on_policy_reverse_kl": REVERSE}, abs=1e-6)
    assert total.item() == pytest.approx(FORWARD + 2 * REVERSE, abs=1e-5)
    assert per_position.tolist() == pytest.approx([FORWARD] * 3 + [2 * REVERSE] * 2, abs=1e-5)


def test_all_masked_batch_is_zero_with_zero_gradients() -> None:
    x = _inputs(0, 0)
    total, parts, _ = L.distillation_loss(L.LossWeights(reverse_kl=1.0, cross_entropy=1.0, reference_ce=1.0), x)
    assert total.item() == 0.0 and parts == {}
    total.backward()
    assert x.t_logits.grad is not None and x.t_logits.grad.numel() == 0
    assert L.weighted_mean(torch.zeros(0), torch.zeros(0)).item() == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_log_probs_at_matches_log_softmax_and_its_gradient(temperature: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(37, 50, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 50, (37, 6))
    ours = L.log_probs_at(logits, ids, temperature)
    ref = torch.log_softmax(logits / temperature, -1).gather(-1, ids)
    torch.testing.assert_close(ours, ref.float())
    g = torch.randn(37, 6)
    (grad_ours,) = torch.autograd.grad(ours, logits, g)
    (grad_ref,) = torch.autograd.grad(ref, logits, g.double())
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-6)
