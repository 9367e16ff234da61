"""Sampling over a restricted head's rows (`services/common/outvocab_sampler.py`) with vLLM's own `Sampler`: the
same tokens as sampling the scattered full vocabulary, the full vocabulary wherever a request reads anything by token
id, and installation only on a restricted head."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from services.common.outvocab import ARCHITECTURE
from services.common.outvocab_sampler import HeadSampler, full_vocabulary_reason, install
from services.common.outvocab_vllm import FullLogits, scatter_logits

VOCAB = 1000
IDS = torch.tensor(sorted({0, 1, 2, *range(5, VOCAB, 7)}), dtype=torch.int64)
ROWS = IDS.numel()


class Model:
    """What `HeadSampler` reads of the vLLM model: its id map, row count and full-logits buffer."""

    def __init__(self) -> None:
        self.token_ids = IDS
        self.output_vocab_rows = ROWS
        self.full_logits = FullLogits(VOCAB)


def metadata(rows: int, temperature: float | None = None, **changes: Any) -> Any:
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    base = SamplingMetadata(
        temperature=None if temperature is None else torch.full((rows,), temperature),
        all_greedy=temperature is None,
        all_random=temperature is not None,
        top_p=None,
        top_k=None,
        generators={},
        max_num_logprobs=None,
        no_penalties=True,
        prompt_token_ids=None,
        frequency_penalties=torch.zeros(rows),
        presence_penalties=torch.zeros(rows),
        repetition_penalties=torch.ones(rows),
        output_token_ids=[[] for _ in range(rows)],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(),
    )
    return replace(base, **changes)


class Counting:
    """vLLM's sampler, recording the width of every logits tensor it is given."""

    def __init__(self) -> None:
        from vllm.v1.sample.sampler import Sampler

        self.inner = Sampler()
        self.widths: list[int] = []
        self.logprobs_mode = self.inner.logprobs_mode

    def __call__(self, logits: torch.Tensor, sampling_metadata: Any, *args: Any, **kwargs: Any) -> Any:
        self.widths.append(logits.shape[-1])
        return self.inner(logits.clone(), sampling_metadata, *args, **kwargs)

    def compute_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        self.widths.append(logits.shape[-1])
        return self.inner.compute_logprobs(logits)


def test_greedy_over_the_head_picks_the_full_vocabularys_argmax_with_its_tie_breaks() -> None:
    torch.manual_seed(0)
    head = torch.randn(64, ROWS, dtype=torch.bfloat16)
    head[3, [4, 9]] = 9.0  # a tie: the first maximum wins on both sides
    inner = Counting()
    sampler = HeadSampler(inner, Model())
    out = sampler(head, metadata(64))
    expected = inner.inner(scatter_logits(head, IDS, VOCAB), metadata(64)).sampled_token_ids
    assert out.sampled_token_ids.dtype == torch.int32 and out.sampled_token_ids.shape == (64, 1)
    assert torch.equal(out.sampled_token_ids, expected)
    assert out.sampled_token_ids[3, 0].item() == IDS[4].item()
    assert inner.widths == [ROWS] and (sampler.head_batches, sampler.full_batches) == (1, 0)


def test_random_sampling_over_the_head_keeps_the_distribution() -> None:
    """Temperature, top-k and top-p over the head's rows: only head tokens, at the full softmax's frequencies."""
    torch.manual_seed(1)
    head = torch.full((1, ROWS), -30.0)
    head[0, [0, 10, 20]] = torch.tensor([0.0, 1.0, 2.0])
    probs = torch.softmax(scatter_logits(head, IDS, VOCAB) / 0.8, dim=-1)[0]
    batch = head.expand(4000, ROWS).contiguous()
    sampler = HeadSampler(Counting(), Model())
    md = metadata(4000, temperature=0.8, top_k=torch.full((4000,), 50), top_p=torch.full((4000,), 0.999))
    tokens = sampler(batch, md).sampled_token_ids[:, 0]
    assert set(tokens.tolist()) <= set(IDS[[0, 10, 20]].tolist())
    for row in (0, 10, 20):
        share = (tokens == IDS[row]).float().mean().item()
        assert abs(share - probs[IDS[row]].item()) < 0.03, (row, share)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"max_num_logprobs": 0}, "logprobs"),
        ({"logprob_token_ids": {0: [5]}}, "logprobs"),
        ({"no_penalties": False, "prompt_token_ids": torch.zeros(8, 4, dtype=torch.int64)}, "penalties"),
        ({"allowed_token_ids_mask": torch.zeros(8, VOCAB, dtype=torch.bool)}, "allowed_token_ids"),
        ({"bad_words_token_ids": {0: [[12]]}}, "bad_words"),
    ],
)
def test_batches_that_read_token_ids_are_sampled_over_the_full_vocabulary(changes: dict[str, Any], reason: str) -> None:
    torch.manual_seed(2)
    head = torch.randn(8, ROWS)
    inner = Counting()
    sampler = HeadSampler(inner, Model())
    md = metadata(8, **changes)
    assert full_vocabulary_reason(md) == reason
    out = sampler(head, md)
    assert inner.widths == [VOCAB] and (sampler.head_batches, sampler.full_batches) == (0, 1)
    assert set(out.sampled_token_ids[:, 0].tolist()) <= set(IDS.tolist())


def test_active_logit_processors_need_the_full_vocabulary_and_idle_ones_do_not() -> None:
    from vllm.v1.sample.logits_processor import LogitsProcessors

    min_tokens = type("MinTokensLogitsProcessor", (), {"min_toks": {}, "is_argmax_invariant": lambda self: False})()
    bias = type("LogitBiasLogitsProcessor", (), {"biases": {}, "is_argmax_invariant": lambda self: False})()
    unknown = type("CustomProcessor", (), {"is_argmax_invariant": lambda self: True})()
    idle = metadata(2, logitsprocs=LogitsProcessors([min_tokens, bias]))
    assert full_vocabulary_reason(idle) is None
    min_tokens.min_toks = {0: (5, [], {2}, False)}
    assert full_vocabulary_reason(idle) == "MinTokensLogitsProcessor"
    min_tokens.min_toks = {}
    bias.biases = {1: {7: 3.0}}
    assert full_vocabulary_reason(idle) == "LogitBiasLogitsProcessor"
    assert (
        full_vocabulary_reason(metadata(2, logitsprocs=LogitsProcessors([unknown])))
        == "logits processor CustomProcessor"
    )


def test_prompt_logprobs_and_full_width_logits_pass_through() -> None:
    inner = Counting()
    sampler = HeadSampler(inner, Model())
    logprobs = sampler.compute_logprobs(torch.randn(3, ROWS))
    assert logprobs.shape == (3, VOCAB) and torch.isneginf(logprobs[:, 3]).all()
    full = scatter_logits(torch.randn(2, ROWS), IDS, VOCAB)
    sampler(full, metadata(2))
    assert inner.widths == [VOCAB, VOCAB] and sampler.head_batches == 0
    assert sampler.logprobs_mode == inner.logprobs_mode  # everything else is the wrapped sampler's


def test_install_wraps_a_restricted_heads_sampler_once_and_leaves_others_alone() -> None:
    from vllm.v1.sample.sampler import Sampler

    trimmed = type(ARCHITECTURE, (), {"head_logits": False})()
    runner = SimpleNamespace(sampler=Sampler(), get_model=lambda: trimmed, speculative_config=None)
    original = runner.sampler
    assert install(runner) and install(runner)
    assert isinstance(runner.sampler, HeadSampler) and runner.sampler.sampler is original and trimmed.head_logits
    full = SimpleNamespace(sampler=original, get_model=lambda: type("LlamaForCausalLM", (), {})())
    assert not install(full) and full.sampler is original
    # Runners it does not know: speculative decoding (its rejection sampler holds the sampler), another sampler type.
    for other in (
        SimpleNamespace(sampler=original, get_model=lambda: trimmed, speculative_config=object()),
        SimpleNamespace(sampler=object(), get_model=lambda: trimmed, speculative_config=None),
    ):
        sampler = other.sampler
        assert not install(other) and other.sampler is sampler


def test_a_mixed_batch_of_top_k_values_samples_over_the_head() -> None:
    """vLLM gives requests without top-k the vocabulary's size as k; with one request at top-k 40 the whole tensor
    reaches the sampler. Over the head's rows those ks must not fail (they did: `topk` out of range)."""
    torch.manual_seed(3)
    head = torch.randn(4, ROWS)
    top_k = torch.tensor([40, VOCAB, ROWS + 5, 3])
    for top_p in (None, torch.full((4,), 0.9)):
        sampler = HeadSampler(Counting(), Model())
        out = sampler(head, metadata(4, temperature=1.0, top_k=top_k, top_p=top_p))
        assert set(out.sampled_token_ids[:, 0].tolist()) <= set(IDS.tolist())
        # The last request keeps only its 3 most likely rows.
        assert out.sampled_token_ids[3, 0].item() in IDS[head[3].topk(3).indices].tolist()
    greedy = HeadSampler(Counting(), Model())(head, metadata(4, top_k=top_k))
    assert torch.equal(greedy.sampled_token_ids[:, 0], IDS[head.argmax(-1)].to(torch.int32))


def test_a_strided_view_of_head_logits_is_sampled_as_its_values() -> None:
    """vLLM pads the head to a multiple of 64 rows and slices the logits to N columns: a strided float32 view."""
    torch.manual_seed(4)
    padded = torch.randn(16, ROWS + 18)
    view = padded[:, :ROWS]
    assert not view.is_contiguous()
    from vllm.v1.sample.sampler import Sampler

    expected = IDS[view.argmax(-1)].to(torch.int32)
    top2 = [IDS[view[row].topk(2).indices].tolist() for row in range(16)]
    out = HeadSampler(Sampler(), Model())(view, metadata(16))  # vLLM's sampler gets the view itself
    assert torch.equal(out.sampled_token_ids[:, 0], expected)
    sampled = HeadSampler(Sampler(), Model())(view, metadata(16, temperature=1.0, top_k=torch.full((16,), 2)))
    for row in range(16):
        assert sampled.sampled_token_ids[row, 0].item() in top2[row]
