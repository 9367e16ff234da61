"""Packing vLLM's flat logprobs: both layouts vLLM produces give sorted top-k plus the sampled logprob."""

from __future__ import annotations

import pytest
from vllm.logprobs import FlatLogprobs, Logprob

from services.teacher.engine import flat_to_logprobs


def test_fast_layout_sampled_first_then_top_k() -> None:
    flat = FlatLogprobs()
    # position 0: sampled 9 (rank 7, outside the top-2); position 1: sampled 4, also top-1
    flat.append_fast([9, 3, 5], [-4.0, -0.5, -1.0], iter([7, 1, 2]), [None] * 3)
    flat.append_fast([4, 4, 8], [-0.2, -0.2, -2.5], iter([1, 1, 2]), [None] * 3)
    packed = flat_to_logprobs(flat, 2)
    assert packed.sampled == [-4.0, -0.2]
    assert packed.top_ids == [3, 5, 4, 8]
    assert packed.top_logprobs == [-0.5, -1.0, -0.2, -2.5]


def test_merged_layout_without_the_duplicate_is_resorted() -> None:
    flat = FlatLogprobs()
    # what a dict round trip leaves: sampled 5 (rank 2) first, its top-k copy dropped
    flat.append({5: Logprob(-1.0, 2), 3: Logprob(-0.5, 1), 7: Logprob(-3.0, 3)})
    # sampled outside the top-k: k + 1 entries
    flat.append({9: Logprob(-6.0, 40), 1: Logprob(-0.1, 1), 2: Logprob(-0.9, 2), 6: Logprob(-1.5, 3)})
    packed = flat_to_logprobs(flat, 3)
    assert packed.sampled == [-1.0, -6.0]
    assert packed.top_ids == [3, 5, 7, 1, 2, 6]
    assert packed.top_logprobs == [-0.5, -1.0, -3.0, -0.1, -0.9, -1.5]


def test_unexpected_shapes_fail_loudly_and_first_skips_positions() -> None:
    flat = FlatLogprobs()
    flat.append(None)  # prompt position 0 has no logprobs
    flat.append({1: Logprob(-0.1, 1), 2: Logprob(-0.2, 2)})
    assert flat_to_logprobs(flat, 2, first=1).top_ids == [1, 2]
    with pytest.raises(RuntimeError, match="position 0"):
        flat_to_logprobs(flat, 2)
