"""A student with a restricted output vocabulary in the trainer: choosing the head from the run's first samples, the
losses on its compact logits (top-k entries outside it go to the tail, targets outside it are masked and counted),
the student factory, spec validation and the memory estimate, and evaluation / generation through its normal
forward. The run itself, end to end, is `test_output_vocab_run.py`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.bench.scale_trainer import synthetic_items
from services.common import outvocab, pb
from services.common.errors import InvalidArgument
from services.common.models import load_causal_lm, load_tokenizer
from services.trainer import losses as L
from services.trainer import vocab
from services.trainer.batching import batch_loss, collate, onto_head
from services.trainer.buffer import REFERENCE, SAMPLE, Item
from services.trainer.evaluate import agreement
from services.trainer.generation import complete
from services.trainer.recipes import with_defaults
from services.trainer.spec import check_memory
from services.trainer.spec import complete as complete_spec
from services.trainer.student import make_student
from tests.trainer.conftest import tiny_spec

LN = math.log
WEIGHTS = L.LossWeights(forward_kl=1.0, reverse_kl=0.5, jsd=0.25, cross_entropy=0.3, reference_ce=0.5)
ON_POLICY = L.LossWeights(forward_kl=0.0, reverse_kl=1.0)


def _model(folder: Path) -> Any:
    torch.manual_seed(0)
    return load_causal_lm(folder, dtype=torch.float32)


# --- the losses on head rows ---------------------------------------------------------------------------------------


def test_a_top_k_entry_outside_the_head_goes_to_the_tail_and_its_target_is_masked() -> None:
    """4-token vocabulary, head {0, 2, 3}. Teacher top-2 ids [0, 1] with p = [.5, .3]: id 1 has no row, so the
    teacher's buckets are [.5, tail .5]; the student's three equal head logits give q = [1/3, tail 2/3]. The sampled
    token 1 has no row either: the cross-entropy term is 0 there and the token is counted."""
    item = Item(0, 0, SAMPLE, [3, 1], 1, np.array([[0, 1]]), np.log(np.array([[0.5, 0.3]], dtype=np.float32)))
    batch = collate([item], pad_id=0)
    on = onto_head(batch, torch.tensor([0, 2, 3]), 4)
    assert on.top_valid.tolist() == [[True, False]] and on.top_ids[0, 0] == 0
    assert torch.isneginf(on.top_logprobs[0, 1]) and on.in_head.tolist() == [False]
    torch.testing.assert_close(L.teacher_buckets(on.top_logprobs).exp(), torch.tensor([[0.5, 0.0, 0.5]]))
    logits = torch.zeros(1, 3, requires_grad=True)  # compact: one logit per head row
    x = L.LossInputs(
        t_logits=logits, top_ids=on.top_ids, top_logprobs=on.top_logprobs, top_valid=on.top_valid,
        sampled=on.targets, t_weights=torch.ones(1), r_logits=torch.zeros(0, 3), r_targets=torch.zeros(0).long(),
        r_weights=torch.zeros(0), sampled_in_head=on.in_head, r_in_head=torch.zeros(0, dtype=torch.bool),
    )  # fmt: skip
    total, parts, _ = L.distillation_loss(L.LossWeights(forward_kl=1.0, cross_entropy=1.0), x)
    expected = 0.5 * LN(0.5 / (1 / 3)) + 0.5 * LN(0.5 / (2 / 3))
    assert parts == pytest.approx({"forward_kl": expected, "cross_entropy": 0.0}, abs=1e-6)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_a_head_over_the_whole_vocabulary_trains_exactly_like_the_full_one(tiny_teacher: Path) -> None:
    """The same batch through the full model and through one trimmed to every token id: the same loss, terms and
    per-source figures, and the same gradients of the decoder and of the head's rows."""
    full = _model(tiny_teacher)
    vocab_size = int(full.config.vocab_size)
    trimmed = outvocab.trim_model(full, range(vocab_size))
    batch = collate(synthetic_items(vocab_size, 12, seed=3), pad_id=0)
    a = batch_loss(full, batch, WEIGHTS, False, None, ON_POLICY)
    b = batch_loss(trimmed, batch, WEIGHTS, False, None, ON_POLICY)
    assert b.outside_head == 0 and a.outside_head == 0
    torch.testing.assert_close(a.loss, b.loss)
    assert a.parts == pytest.approx(b.parts, rel=1e-5) and a.source_tokens == b.source_tokens
    assert a.source_loss == pytest.approx(b.source_loss, rel=1e-5)
    a.loss.backward()
    b.loss.backward()
    for name, p in full.model.layers.named_parameters():
        q = dict(trimmed.model.layers.named_parameters())[name]
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    # The tied full head's gradient is the head part of the embedding's; the trimmed head has its own.
    assert trimmed.lm_head.weight.grad is not None and torch.isfinite(trimmed.lm_head.weight.grad).all()


def test_targets_outside_a_smaller_head_are_masked_and_counted(tiny_teacher: Path) -> None:
    full = _model(tiny_teacher)
    vocab_size = int(full.config.vocab_size)
    keep = list(range(0, vocab_size, 2))  # every even id
    trimmed = outvocab.trim_model(full, keep)
    items = synthetic_items(vocab_size, 12, seed=4)
    batch = collate(items, pad_id=0)
    out = batch_loss(trimmed, batch, WEIGHTS, False, None, ON_POLICY)
    assert out.outside_head == int((batch.targets % 2 == 1).sum()) > 0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in trimmed.parameters() if p.grad is not None)
    # Only reference rows whose targets all fall outside the head: the reference term is exactly 0.
    odd = [Item(0, 0, REFERENCE, [2, 3, 5, 7], 1, source=REFERENCE)]
    only = batch_loss(trimmed, collate(odd, 0), L.LossWeights(reference_ce=1.0), False)
    assert only.outside_head == 3 and only.parts == {"reference_ce": 0.0}


# --- choosing the head ---------------------------------------------------------------------------------------------


def test_the_head_keeps_the_covered_answer_tokens_and_always_the_special_and_chat_tokens(tiny_teacher: Path) -> None:
    tok = load_tokenizer(tiny_teacher)
    vocab_size = len(tok)
    items = synthetic_items(vocab_size, 40, seed=5)
    choice = vocab.choose(items, tok, 0.9, vocab_size)
    ids = set(choice.token_ids)
    assert len(ids) % outvocab.ROW_MULTIPLE == 0 and len(ids) < vocab_size
    assert {tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_start|>")} <= ids
    assert vocab.always_ids(tok) <= ids
    counted: dict[int, float] = {t: float(c) for t, c in vocab.answer_counts(items).items()}
    for token, mass in vocab.top_k_mass(items).items():
        counted[token] = counted.get(token, 0.0) + mass
    assert outvocab.coverage_of(choice.token_ids, counted) >= 0.9  # what the selection guarantees
    assert 0.9 <= choice.coverage <= 1.0  # the answer tokens' share (reported), here as high
    assert choice.coverage == pytest.approx(outvocab.coverage_of(choice.token_ids, vocab.answer_counts(items)))
    # The teacher's top-k mass counts too: a token only ever in a top-k can be chosen.
    only_top = Item(0, 0, SAMPLE, [1, 2], 1, np.array([[300, 2]]), np.log(np.array([[0.9, 0.05]], dtype=np.float32)))
    assert 300 in vocab.choose([only_top], tok, 1.0, vocab_size).token_ids
    sample = pb.common.TeacherSample(completion_token_ids=[choice.token_ids[0]] * 3 + [vocab_size - 1])
    held = vocab.heldout_coverage(choice.token_ids, [sample])
    assert held == (1.0 if vocab_size - 1 in ids else 0.75)
    assert vocab.heldout_coverage(choice.token_ids, []) is None


# --- the student factory -------------------------------------------------------------------------------------------


def _pruned(**kw: Any) -> pb.trainer.StudentRecipe:
    return pb.trainer.StudentRecipe(pruned=pb.trainer.PrunedStudent(num_layers=2, **kw), output_vocab_coverage=0.9)


def test_every_kind_of_student_gets_the_head_and_a_restricted_checkpoint_keeps_its_own(
    tiny_teacher: Path, tmp_path: Path
) -> None:
    keep = list(range(0, 128))
    recipes = {
        "pruned": _pruned(),
        "config": pb.trainer.StudentRecipe(config=pb.trainer.StudentShape(num_layers=1, hidden_size=64,
                                           intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)),
    }  # fmt: skip
    for name, recipe in recipes.items():
        out = tmp_path / name
        count = make_student(tiny_teacher, recipe, out, output_vocab=keep)
        config = json.loads((out / "config.json").read_text())
        assert config["output_vocab_size"] == len(keep) and config["architectures"] == [outvocab.ARCHITECTURE]
        model = load_causal_lm(out)
        assert model.lm_head.token_ids.tolist() == keep and count == sum(p.numel() for p in model.parameters())
        assert (out / "tokenizer.json").is_file()
    # A full-vocabulary starting point is trimmed; one with a head keeps it whatever ids are asked for.
    init = pb.trainer.StudentRecipe(init_checkpoint=str(tmp_path / "pruned"), output_vocab_coverage=0.9)
    make_student(tiny_teacher, init, tmp_path / "again", output_vocab=list(range(200, 264)))
    assert load_causal_lm(tmp_path / "again").lm_head.token_ids.tolist() == keep
    make_student(tiny_teacher, pb.trainer.StudentRecipe(pruned=pb.trainer.PrunedStudent(num_layers=2)), tmp_path / "f")
    init.init_checkpoint = str(tmp_path / "f")
    make_student(tiny_teacher, init, tmp_path / "trimmed-later", output_vocab=keep)
    assert load_causal_lm(tmp_path / "trimmed-later").lm_head.token_ids.tolist() == keep


def test_evaluation_and_generation_use_the_normal_forward(tiny_teacher: Path, tiny_samples: list) -> None:
    """Greedy and sampled completions only ever hold head ids; the held-out KL / top-1 / perplexity are finite, and
    with a head over every id equal to the full model's."""
    full = _model(tiny_teacher).eval()
    tok = load_tokenizer(tiny_teacher)
    vocab_size = int(full.config.vocab_size)
    held = [s for s in tiny_samples if s.split == pb.common.SPLIT_EVAL]
    everything = outvocab.trim_model(full, range(vocab_size)).eval()
    a, b = agreement(full, held, 256, 0, False), agreement(everything, held, 256, 0, False)
    assert a == pytest.approx(b, rel=1e-5)
    keep = sorted(set(range(64)) | vocab.always_ids(tok))
    small = outvocab.trim_model(full, keep).eval()
    kl, top1, ppl = agreement(small, held, 256, 0, False)
    assert kl is not None and top1 is not None and ppl is not None
    assert math.isfinite(kl) and 0.0 <= top1 <= 1.0 and math.isfinite(ppl)
    prompts = [list(s.prompt_token_ids) for s in held]
    for temperature in (0.0, 1.0):
        rows = complete(small, tok, prompts, 12, False, temperature=temperature)
        assert rows and all(t in set(keep) for row in rows for t in row)


# --- the recipe option ---------------------------------------------------------------------------------------------


def test_the_option_is_validated_naming_the_field_and_kept_with_the_default_student(tiny_teacher: Path) -> None:
    config = json.loads((tiny_teacher / "config.json").read_text())
    for bad in (1.5, -0.1, float("nan")):
        spec = tiny_spec()
        spec.student.output_vocab_coverage = bad
        with pytest.raises(InvalidArgument, match=r"spec\.student\.output_vocab_coverage"):
            complete_spec(spec, config)
    spec = tiny_spec()
    spec.student.output_vocab_coverage = 0.99
    with pytest.raises(InvalidArgument, match=r"spec\.student\.output_vocab_coverage.*Llama"):
        complete_spec(spec, {**config, "model_type": "gpt2"})
    assert complete_spec(spec, config).student.output_vocab_coverage == pytest.approx(0.99)
    only = pb.trainer.RunSpec(student=pb.trainer.StudentRecipe(output_vocab_coverage=0.99))
    filled = with_defaults(only, config)
    assert filled.student.WhichOneof("source") == "pruned"
    assert filled.student.output_vocab_coverage == pytest.approx(0.99)


def test_the_memory_estimate_bounds_a_restricted_head_by_the_vocabulary(
    tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """N is chosen from the run's samples after the check: the estimate counts the head's own (untied) rows and
    logits as wide as the vocabulary, upper bounds, so a run the check accepts fits whatever N comes out."""
    from services.trainer import budget

    config = json.loads((tiny_teacher / "config.json").read_text())
    spec = complete_spec(tiny_spec(), config)
    calls: list[tuple[int, ...]] = []
    real = budget.run_bytes
    monkeypatch.setattr(budget, "run_bytes", lambda *a: calls.append(a) or real(*a))
    for coverage in (0.0, 0.9):
        spec.student.output_vocab_coverage = coverage
        check_memory(spec, config, 2**40)
    (full_student, _, full_width, *_), (trim_student, _, trim_width, *_) = calls
    vocab_size, hidden = int(config["vocab_size"]), spec.student.pruned.hidden_size
    assert full_width == trim_width == vocab_size
    assert trim_student - full_student == vocab_size * hidden
    assert real(0, 0, 64, 2, 8) * vocab_size == real(0, 0, vocab_size, 2, 8) * 64  # logits scale with the width
