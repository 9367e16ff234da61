"""A task-restricted output vocabulary: the student's LM head covers only the tokens its use case produces.

FR-Spec (arXiv:2502.14856) and VocabTrim (arXiv:2506.22694) restrict a draft model's LM head to the tokens its
target actually emits; on a small model the head over a 49,152-token vocabulary is a large share of every decode
step. Here the student's input embedding stays full (any prompt token can be read) and its head has N rows, with
an id map from head row to the tokenizer's token id. Every forward pass scatters the N logits back into the full
vocabulary with -inf elsewhere (as vLLM's own EAGLE-3 drafts do with their `d2t` map), so generation, sampling,
the tokenizer and every consumer of token ids are unchanged; the trainer asks for the compact logits
(`OutputVocabHead.compact`) and maps the teacher's token ids onto head rows (`head_index`).

The format, a plain Hugging Face folder of safetensors:
- config.json: `"architectures": ["DistilleryTrimmedLlamaForCausalLM"]`, `"output_vocab_size": N`,
  `"tie_word_embeddings": false`; `vocab_size` stays the tokenizer's full vocabulary (the embedding's rows).
- model.safetensors: `lm_head.weight` (N, hidden) and `lm_head.token_ids` (int64, N, strictly ascending, every id
  in [0, vocab_size)).

Only Llama-family students (model_type "llama", the default teacher's) have the restricted head; others are
refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ARCHITECTURE = "DistilleryTrimmedLlamaForCausalLM"
CONFIG_KEY = "output_vocab_size"
TOKEN_IDS = "lm_head.token_ids"
SUPPORTED_MODEL_TYPES = ("llama",)
#: Head rows are rounded up to a multiple of this (matmul kernels like aligned widths).
ROW_MULTIPLE = 64


class OutputVocabError(ValueError):
    """A restricted output vocabulary that cannot be built or is malformed."""


def is_trimmed(config: Any) -> bool:
    """Whether a model config (a transformers config or a config.json dict) has a restricted output vocabulary."""
    value = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    return bool(value)


def check_token_ids(token_ids: Tensor, vocab_size: int) -> None:
    """Raises OutputVocabError unless `token_ids` is a 1-D integer tensor of strictly ascending ids in
    [0, vocab_size)."""
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise OutputVocabError(f"{TOKEN_IDS}: must be a non-empty 1-D tensor, got shape {tuple(token_ids.shape)}")
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise OutputVocabError(f"{TOKEN_IDS}: must hold integers, got {token_ids.dtype}")
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size:
        raise OutputVocabError(f"{TOKEN_IDS}: ids must be in [0, {vocab_size}), got {int(token_ids.max())}")
    if token_ids.numel() > 1 and not bool((token_ids[1:] > token_ids[:-1]).all()):
        raise OutputVocabError(f"{TOKEN_IDS}: ids must be strictly ascending (no repeats)")


def check_folder(folder: Path) -> int | None:
    """Checks a model folder's restricted output vocabulary without loading the model (its config.json and the
    safetensors headers, plus the id map itself); returns N, or None for a full-vocabulary model. Raises
    OutputVocabError naming what is malformed: what an engine would refuse, found before one is touched."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise OutputVocabError(f"config.json is unreadable: {exc}") from exc
    if not is_trimmed(config):
        return None
    rows = config.get(CONFIG_KEY)
    if not isinstance(rows, int) or rows < 1:
        raise OutputVocabError(f"config.{CONFIG_KEY}={rows!r}: must be a positive row count")
    if ARCHITECTURE not in (config.get("architectures") or []):
        raise OutputVocabError(f"config.{CONFIG_KEY} is set but config.architectures is {config.get('architectures')}")
    check_supported(config)
    found: dict[str, Any] = {}
    try:
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name == TOKEN_IDS:
                        found[name] = handle.get_tensor(name)
                    elif name == "lm_head.weight":
                        found[name] = tuple(handle.get_slice(name).get_shape())
    except (OSError, SafetensorError) as exc:
        raise OutputVocabError(f"the weights are unreadable: {exc}") from exc
    if TOKEN_IDS not in found:
        raise OutputVocabError(f"config.{CONFIG_KEY} is set but the weights have no {TOKEN_IDS}")
    token_ids = found[TOKEN_IDS]
    check_token_ids(token_ids, int(config["vocab_size"]))
    if token_ids.numel() != rows:
        raise OutputVocabError(f"config.{CONFIG_KEY}={rows} but {TOKEN_IDS} has {token_ids.numel()} ids")
    shape = found.get("lm_head.weight")
    if shape is None or shape[0] != rows:
        raise OutputVocabError(f"lm_head.weight has shape {shape}: config.{CONFIG_KEY} says {rows} rows")
    return rows


def select_output_vocab(
    counts: Mapping[int, float],
    vocab_size: int,
    coverage: float,
    always: Iterable[int] = (),
    multiple: int = ROW_MULTIPLE,
) -> list[int]:
    """The smallest set of token ids whose counted mass reaches `coverage` of the total (most frequent first), plus
    `always` (special tokens: end of turn, the chat template's), padded with the next most frequent ids (then the
    lowest unused ids) to a multiple of `multiple`. Sorted ascending.

    `counts`: token id → how often the use case produces it (occurrences in teacher answers and references, and
    the teacher's top-k probability mass at each position)."""
    if not 0 < coverage <= 1:
        raise OutputVocabError(f"coverage={coverage}: must be in (0, 1]")
    bad = [t for t in (*counts, *always) if not 0 <= int(t) < vocab_size]
    if bad:
        raise OutputVocabError(f"token id {bad[0]} is outside the vocabulary of {vocab_size}")
    ranked = sorted(((float(c), int(t)) for t, c in counts.items() if c > 0), key=lambda x: (-x[0], x[1]))
    total = sum(c for c, _ in ranked)
    chosen = {int(t) for t in always}
    mass = sum(float(counts.get(t, 0.0)) for t in chosen)
    rest = [t for _, t in ranked if t not in chosen]
    i = 0
    while total > 0 and mass < coverage * total and i < len(rest):
        chosen.add(rest[i])
        mass += float(counts[rest[i]])
        i += 1
    if not chosen:
        raise OutputVocabError("no token ids counted: nothing to build an output vocabulary from")
    target = min(vocab_size, math.ceil(len(chosen) / multiple) * multiple)
    filler = iter([*rest[i:], *(t for t in range(vocab_size) if t not in counts)])
    while len(chosen) < target:
        chosen.add(next(filler))
    return sorted(chosen)


def coverage_of(token_ids: Iterable[int], counts: Mapping[int, float]) -> float:
    """The share of `counts`' mass that `token_ids` covers (1.0 for no counts)."""
    keep = set(token_ids)
    total = sum(counts.values())
    return 1.0 if total <= 0 else sum(c for t, c in counts.items() if t in keep) / total


def head_index(token_ids: Tensor, vocab_size: int) -> Tensor:
    """Full-vocabulary id → head row (int64, -1 where the head has no row): maps the teacher's ids onto the head."""
    index = torch.full((vocab_size,), -1, dtype=torch.int64, device=token_ids.device)
    index[token_ids.long()] = torch.arange(token_ids.numel(), device=token_ids.device)
    return index


class OutputVocabHead(nn.Module):
    """An LM head over `token_ids` only. Called like `nn.Linear`, it returns full-vocabulary logits (-inf where the
    head has no row); `compact` returns the N head logits."""

    def __init__(self, hidden_size: int, token_ids: Tensor, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(token_ids.numel(), hidden_size))
        self.token_ids: Tensor
        self.register_buffer("token_ids", token_ids.to(torch.int64).clone(), persistent=True)

    def compact(self, hidden: Tensor) -> Tensor:
        return nn.functional.linear(hidden, self.weight)

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.compact(hidden)
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        full[..., self.token_ids] = logits
        return full


def _trimmed_class() -> Any:
    from transformers import LlamaForCausalLM

    class DistilleryTrimmedLlamaForCausalLM(LlamaForCausalLM):  # type: ignore[misc]
        """Llama with an `OutputVocabHead` (see the module's docstring for the format)."""

        _tied_weights_keys: dict[str, str] = {}  # noqa: RUF012 (transformers reads the class attribute)
        _tp_plan: dict[str, str] = {}  # noqa: RUF012

        def __init__(self, config: Any) -> None:
            n = int(getattr(config, CONFIG_KEY, 0) or 0)
            if n < 1:
                raise OutputVocabError(f"config.{CONFIG_KEY} must be a positive row count, got {n}")
            config.tie_word_embeddings = False
            super().__init__(config)
            # Placeholder ids (0..N-1); from_pretrained overwrites them with the stored map.
            self.lm_head = OutputVocabHead(config.hidden_size, torch.arange(n), config.vocab_size)
            self.post_init()

        def get_output_embeddings(self) -> Any:
            return None  # not an nn.Linear over the vocabulary: nothing may tie or resize it

    DistilleryTrimmedLlamaForCausalLM.__name__ = ARCHITECTURE
    DistilleryTrimmedLlamaForCausalLM.__qualname__ = ARCHITECTURE
    return DistilleryTrimmedLlamaForCausalLM


_CLASS: Any = None


def trimmed_class() -> Any:
    """The transformers class of a student with a restricted head (built on first use: transformers is heavy)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _trimmed_class()
    return _CLASS


def check_supported(config: Any) -> None:
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OutputVocabError(
            f"a restricted output vocabulary needs a Llama-family student (model_type {list(SUPPORTED_MODEL_TYPES)});"
            f" this one is {model_type!r}"
        )


def trim_model(model: Any, token_ids: Iterable[int]) -> Any:
    """A copy of a full-vocabulary Llama causal LM whose head keeps only `token_ids`' rows (the input embedding and
    every other weight unchanged)."""
    check_supported(model.config)
    ids = torch.tensor(sorted(set(int(t) for t in token_ids)), dtype=torch.int64)
    vocab_size = int(model.config.vocab_size)
    check_token_ids(ids, vocab_size)
    config = model.config.__class__.from_dict(model.config.to_dict())
    setattr(config, CONFIG_KEY, int(ids.numel()))
    config.tie_word_embeddings = False
    config.architectures = [ARCHITECTURE]
    cls = trimmed_class()
    dtype = next(model.parameters()).dtype
    trimmed = cls(config).to(dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = trimmed.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight", "lm_head.token_ids"}:
        raise OutputVocabError(f"trim: weights do not match (missing {missing}, unexpected {unexpected})")
    full_head = model.get_output_embeddings().weight
    with torch.no_grad():
        trimmed.lm_head.weight.copy_(full_head[ids].to(dtype))
        trimmed.lm_head.token_ids.copy_(ids)
    return trimmed


def load_trimmed(folder: Path, dtype: Any = None) -> Any:
    """A restricted-head student from a safetensors folder, its id map checked."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    check_supported(config)
    model = trimmed_class().from_pretrained(
        folder, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False, local_files_only=True
    )
    check_token_ids(model.lm_head.token_ids, int(config.vocab_size))
    if model.lm_head.token_ids.numel() != int(getattr(config, CONFIG_KEY)):
        raise OutputVocabError(
            f"{folder}: config.{CONFIG_KEY}={getattr(config, CONFIG_KEY)} but {TOKEN_IDS} has "
            f"{model.lm_head.token_ids.numel()} ids"
        )
    return model


def trim_folder(source: Path, token_ids: Iterable[int], out_dir: Path) -> int:
    """Writes `source` (a full-vocabulary student folder) with its head restricted to `token_ids` into `out_dir`,
    tokenizer files and all; returns the parameter count."""
    import shutil

    from services.common.models import load_causal_lm

    model = load_causal_lm(source)
    trimmed = trim_model(model, token_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    trimmed.save_pretrained(out_dir, safe_serialization=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != "config.json":
            shutil.copy2(path, out_dir / path.name)
    return sum(p.numel() for p in trimmed.parameters())
