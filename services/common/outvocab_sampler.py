"""Sampling over a restricted head's own N columns in a running vLLM engine (serving's engines).

A restricted student's `compute_logits` scatters its N head logits into a (T, vocab) float32 tensor that is -inf
elsewhere (`outvocab_vllm.FullLogits`), so vLLM's sampler, logprobs, penalties and logit processors all see the usual
vocabulary. The price is that the sampler scans every column: greedy argmax over 49,152 columns was 8% of the default
student's engine step at 256 streams (py-spy), against a head of 192 rows.

`install(runner)` makes the model hand out its N head logits as they are and wraps the runner's sampler in
`HeadSampler`:
- a batch whose sampling reads nothing by token id is sampled over the N columns, and each sampled row is mapped to
  its token (`token_ids[row]`). That is the same distribution: temperature, softmax, top-k, top-p and min-p over
  columns that are -inf outside the head keep the same tokens with the same probabilities, and greedy picks the same
  token (ties aside: the full tensor's first maximum and the head's first maximum are the same token, since the id map
  is ascending);
- a batch where any request asks for something indexed by token id (logprobs, penalties, allowed or bad words, a
  logit bias, min_tokens before its count, a thinking budget, or any logits processor this module does not know) gets
  the full tensor first, as without this module;
- the runner's prompt-logprobs path (`compute_logprobs` on `compute_logits` of the prompt) gets the full tensor too.

What it does not cover: structured outputs, whose grammar bitmask vLLM applies to the logits before the sampler runs.
Serving never asks for them (its `Sampling` has no such field); the teacher never has a restricted head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from services.common.outvocab import ARCHITECTURE

#: vLLM's built-in logits processors and the attribute that holds their per-request state (empty: inactive).
_KNOWN_PROCESSORS = {"MinPLogitsProcessor": None, "LogitBiasLogitsProcessor": "biases",
                     "MinTokensLogitsProcessor": "min_toks"}  # fmt: skip


def full_vocabulary_reason(metadata: Any) -> str | None:
    """Why this batch must be sampled over the full vocabulary (None: its head's columns are enough)."""
    if metadata.max_num_logprobs is not None or metadata.logprob_token_ids:
        return "logprobs"
    if not metadata.no_penalties:
        return "penalties"
    if metadata.allowed_token_ids_mask is not None:
        return "allowed_token_ids"
    if metadata.bad_words_token_ids:
        return "bad_words"
    holder = getattr(metadata, "thinking_budget_state_holder", None)
    if holder is not None and holder.has_tracked_requests():
        return "thinking_budget"
    for processor in metadata.logitsprocs.all:
        name = type(processor).__name__
        if name not in _KNOWN_PROCESSORS:
            return f"logits processor {name}"
        state = _KNOWN_PROCESSORS[name]
        if state is not None and getattr(processor, state):
            return name
    return None


class HeadSampler:
    """vLLM's `Sampler` for a model whose `compute_logits` returns its N head logits (see the module's docstring).

    Everything but `forward` and `compute_logprobs` is the wrapped sampler's own."""

    def __init__(self, sampler: Any, model: Any) -> None:
        self.sampler = sampler
        self.model = model
        self.head_batches = 0
        """Batches sampled over the head's columns."""
        self.full_batches = 0
        """Batches that needed the full vocabulary."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)

    def _full(self, logits: Any) -> Any:
        if logits is not None and logits.shape[-1] == self.model.output_vocab_rows:
            return self.model.full_logits(logits, self.model.token_ids)
        return logits

    def __call__(self, logits: Any, sampling_metadata: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        if logits is None or logits.shape[-1] != self.model.output_vocab_rows:
            return self.sampler(logits, sampling_metadata, *args, **kwargs)
        if full_vocabulary_reason(sampling_metadata) is not None:
            self.full_batches += 1
            return self.sampler(self._full(logits), sampling_metadata, *args, **kwargs)
        self.head_batches += 1
        top_k = sampling_metadata.top_k
        if top_k is not None:
            # vLLM gives a request without top-k the vocabulary's size as its k, and a mixed batch passes every k: over
            # N columns a k ≥ N is no top-k (the same distribution), and a k beyond N would fail `topk` (measured by
            # review: the engine died). Greedy requests count here too.
            sampling_metadata = dataclasses.replace(sampling_metadata, top_k=top_k.clamp(max=logits.shape[-1]))
        out = self.sampler(logits, sampling_metadata, *args, **kwargs)
        out.sampled_token_ids = self.model.token_ids[out.sampled_token_ids.long()].to(torch.int32)
        return out

    forward = __call__

    def compute_logprobs(self, logits: Any) -> Any:
        return self.sampler.compute_logprobs(self._full(logits))


def install(runner: Any) -> bool:
    """Samples over the head's columns in this model runner when its model has a restricted head and the runner is
    one this module knows: vLLM's V1 runner with its own `Sampler` and no speculative decoding (whose rejection sampler
    holds the sampler unwrapped). Idempotent; returns whether it is on."""
    from vllm.v1.sample.sampler import Sampler

    model = runner.get_model()
    if type(model).__name__ != ARCHITECTURE:
        return False
    if getattr(runner, "speculative_config", None) is not None:
        return False
    if not isinstance(runner.sampler, HeadSampler | Sampler):
        return False  # e.g. vLLM's V2 runner on GPUs, whose sampler takes the input batch, not SamplingMetadata
    if not isinstance(runner.sampler, HeadSampler):
        runner.sampler = HeadSampler(runner.sampler, model)
    model.head_logits = True
    return True
