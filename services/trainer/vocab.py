"""The student's restricted output vocabulary, chosen at run start from the run's first samples.

What the student must be able to write is what its training signal asks of it: the answer tokens of the first
training items (the teacher's completions, scored references and reference answers) and, at every teacher-sample
position, the teacher's top-k probability mass (the alternatives the KD losses pull towards); the words of their
prompts, which answers restate; plus the tokens no use case may lose: the tokenizer's special tokens and the chat
template's (end of turn above all).
`services.common.outvocab.select_output_vocab` keeps the most frequent of them up to the recipe's coverage.

Coverage figures are shares of *answer tokens* (occurrences, not top-k mass), so the one on the selection samples
and the one on the held-out teacher answers (`heldout_coverage`) compare like with like.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common import outvocab, pb
from services.trainer.buffer import Item

#: An empty exchange rendered by the chat template: its scaffolding tokens (role markers, end of turn, newlines).
_TEMPLATE_PROBE = [{"role": "system", "content": ""}, {"role": "user", "content": ""},
                   {"role": "assistant", "content": ""}]  # fmt: skip


@dataclass(frozen=True)
class Choice:
    """The head's token ids (ascending) and the share of the selection samples' answer tokens they cover."""

    token_ids: list[int]
    coverage: float


def answer_counts(items: Iterable[Item]) -> Counter[int]:
    """Occurrences of each target token of `items` (every item's tokens after its prompt)."""
    counts: Counter[int] = Counter()
    for it in items:
        counts.update(it.input_ids[it.prompt_len :])
    return counts


def top_k_mass(items: Iterable[Item]) -> dict[int, float]:
    """Σ over teacher-sample positions of the teacher's probability of each top-k id (padding, −inf, adds 0)."""
    mass: dict[int, float] = {}
    for it in items:
        if it.top_ids is None or it.top_logprobs is None:
            continue
        ids = it.top_ids.reshape(-1)
        probs = np.exp(it.top_logprobs.astype(np.float64)).reshape(-1)
        keep = probs > 0
        for token, p in zip(ids[keep].tolist(), probs[keep].tolist(), strict=True):
            mass[token] = mass.get(token, 0.0) + p
    return mass


def always_ids(tokenizer: Any) -> set[int]:
    """Special tokens and the chat template's own tokens: kept whatever the samples say."""
    ids = {int(t) for t in tokenizer.all_special_ids if t is not None}
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(_TEMPLATE_PROBE, add_generation_prompt=False, tokenize=True)
        if not isinstance(rendered, list):  # transformers ≥ 5 returns a BatchEncoding
            rendered = rendered["input_ids"]
        ids.update(int(t) for t in rendered)
    return ids


def prompt_counts(items: Iterable[Item]) -> Counter[int]:
    """Occurrences of each prompt token of `items`: answers restate the question's words (names, objects)."""
    counts: Counter[int] = Counter()
    for it in items:
        counts.update(it.input_ids[: it.prompt_len])
    return counts


def choose(items: Sequence[Item], tokenizer: Any, coverage: float, vocab_size: int) -> Choice:
    """The head of a student trained on items like `items`, at `coverage` of their answer-token + top-k mass + their
    prompts' tokens (a held-out question names things no training answer did; the student must be able to restate
    them)."""
    answers = answer_counts(items)
    counts: dict[int, float] = {t: float(c) for t, c in answers.items()}
    for token, n in prompt_counts(items).items():
        counts[token] = counts.get(token, 0.0) + n
    for token, mass in top_k_mass(items).items():
        counts[token] = counts.get(token, 0.0) + mass
    ids = outvocab.select_output_vocab(counts, vocab_size, coverage, always_ids(tokenizer))
    return Choice(ids, outvocab.coverage_of(ids, answers))


def heldout_coverage(token_ids: Iterable[int], samples: Iterable[pb.common.TeacherSample]) -> float | None:
    """The share of the held-out teacher answers' tokens the head has a row for (None without any)."""
    counts: Counter[int] = Counter()
    for sample in samples:
        counts.update(sample.completion_token_ids)
    return outvocab.coverage_of(token_ids, counts) if counts else None
