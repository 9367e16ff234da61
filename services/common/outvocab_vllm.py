"""vLLM's model class for students with a restricted output vocabulary, registered as an out-of-tree model.

`DistilleryTrimmedLlamaForCausalLM` (the format: `services/common/outvocab.py`) is vLLM's Llama with an LM head of
N rows and the id map `lm_head.token_ids`; `compute_logits` scatters the N logits into the full vocabulary with -inf
elsewhere, as vLLM's own EAGLE-3 drafts do with their `d2t` map, so the sampler, logprobs, penalties and the
tokenizer see the usual vocabulary and can only ever pick a token the head has a row for.

vLLM resolves architectures through its `ModelRegistry` in every process that builds a model config or a model: the
caller's, the engine core's, and (executor "mp") its workers. On CPUs vLLM spawns them (the CPU platform sets
VLLM_WORKER_MULTIPROC_METHOD=spawn), so a registration made in the caller is not inherited. Two ways cover it:
- the `vllm.general_plugins` entry point `distillery_outvocab` (pyproject.toml), which vLLM runs in each of its
  processes once the project is installed;
- `register()`, idempotent, which `services/common/vllm_engine.py` calls before an engine starts, in the engine-core
  entry point it installs (spawned and forked cores alike), and which serving's worker extension calls when a
  worker imports it.

vLLM imports this module in its engine processes: nothing heavy is imported at module level, and the model class is
built on first access (`module:Class`, vLLM's lazy registration string).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.outvocab import ARCHITECTURE, CONFIG_KEY, TOKEN_IDS, OutputVocabError, check_token_ids

if TYPE_CHECKING:
    from torch import Tensor

#: vLLM's lazy "module:Class" reference to the model class.
MODEL_CLASS = f"{__name__}:{ARCHITECTURE}"


def register() -> None:
    """Registers the model class with vLLM's `ModelRegistry` in this process (safe to call any number of times)."""
    from vllm import ModelRegistry

    registered = ModelRegistry.models.get(ARCHITECTURE)
    if registered is not None and getattr(registered, "module_name", None) == __name__:
        return
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def scatter_logits(logits: Tensor, token_ids: Tensor, vocab_size: int) -> Tensor:
    """Full-vocabulary float32 logits (T, vocab_size) from head logits (T, N): row j lands on token `token_ids[j]`,
    every other token gets -inf.

    float32 because vLLM's sampler converts the logits to float32 first (`Sampler.forward`): returning them in that
    dtype saves it a copy of the whole (T, vocab_size) tensor; the cast of the N head logits happens inside the
    scatter."""
    import torch

    full = torch.full((logits.shape[0], vocab_size), float("-inf"), dtype=torch.float32, device=logits.device)
    full[:, token_ids] = logits.to(torch.float32)
    return full


class FullLogits:
    """`scatter_logits` into one reused buffer: its columns outside the head are set to -inf once, and each step
    writes only the N head columns of its T rows and returns a view of the first T rows.

    Filling a fresh (T, 49,152) float32 tensor with -inf at every step was 24% of the default student's engine step
    at 256 streams (py-spy), more than its head and sampler together. Reuse is safe because nothing vLLM's sampler
    does in place turns -inf finite: temperature divides, penalties and logit biases add or scale, top-k/top-p/min-p
    and allowed or bad words mask with -inf; and a step's logits are sampled before the next step's are computed. A
    reload that brings another id map (same N, in place) is noticed and the old map's columns are reset."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.buffer: Tensor | None = None
        self.ids: Tensor | None = None

    def __call__(self, logits: Tensor, token_ids: Tensor) -> Tensor:
        import torch

        rows = logits.shape[0]
        buffer = self.buffer
        if buffer is None or buffer.shape[0] < rows or buffer.device != logits.device:
            size = max(rows, 2 * buffer.shape[0]) if buffer is not None else max(rows, 64)
            buffer = torch.full((size, self.vocab_size), float("-inf"), dtype=torch.float32, device=logits.device)
            self.buffer, self.ids = buffer, None
        if self.ids is None or not torch.equal(self.ids, token_ids):
            if self.ids is not None:
                buffer[:, self.ids] = float("-inf")
            self.ids = token_ids.clone()
        out = buffer[:rows]
        out[:, token_ids] = logits.to(torch.float32)
        return out


def check_loaded_token_ids(token_ids: Tensor, rows: int, vocab_size: int) -> None:
    """Raises OutputVocabError unless a checkpoint's `lm_head.token_ids` fits a head of `rows` rows."""
    check_token_ids(token_ids, vocab_size)
    if token_ids.numel() != rows:
        raise OutputVocabError(f"config.{CONFIG_KEY}={rows} but {TOKEN_IDS} has {token_ids.numel()} ids")


def token_ids_digest(token_ids: Tensor | None) -> str:
    """sha256 of an id map as int64 (empty for a full-vocabulary head): compares the map an engine holds with a
    checkpoint's."""
    import hashlib

    import torch

    if token_ids is None:
        return ""
    return hashlib.sha256(token_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def stored_token_ids(folder: Path) -> Tensor | None:
    """A model folder's `lm_head.token_ids` as stored (None where its weights have none)."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            if TOKEN_IDS in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                return handle.get_tensor(TOKEN_IDS)
    return None


def _model_class() -> Any:
    import torch
    from vllm.distributed import get_pp_group
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.utils import maybe_prefix

    class DistilleryTrimmedLlamaForCausalLM(LlamaForCausalLM):  # type: ignore[misc]
        """vLLM's Llama with an untied LM head over `lm_head.token_ids` only (N rows)."""

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            config = vllm_config.model_config.hf_config
            rows = int(getattr(config, CONFIG_KEY, 0) or 0)
            if rows < 1:
                raise OutputVocabError(f"config.{CONFIG_KEY} must be a positive row count, got {rows}")
            config.tie_word_embeddings = False
            # The parent builds a full-vocabulary head first; its weight is an untouched torch.empty, replaced here.
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.output_vocab_rows = rows
            self.full_logits = FullLogits(int(config.vocab_size))
            # Set by `outvocab_sampler.install` once the runner's sampler maps head rows to tokens itself.
            self.head_logits = False
            if get_pp_group().is_last_rank:
                self.lm_head = ParallelLMHead(
                    rows,
                    config.hidden_size,
                    quant_config=vllm_config.quant_config,
                    prefix=maybe_prefix(prefix, "lm_head"),
                )
                # Placeholder ids; `load_weights` checks the checkpoint's map and AutoWeightsLoader copies it in (a
                # persistent buffer: vLLM's in-place reload replaces it like a weight).
                self.lm_head.register_buffer("token_ids", torch.arange(rows, dtype=torch.int64), persistent=True)
                self.logits_processor = LogitsProcessor(rows, scale=getattr(config, "logit_scale", 1.0))

        @property
        def token_ids(self) -> Tensor:
            """The head's id map: row j scores token `token_ids[j]`."""
            ids = self.lm_head.token_ids
            assert isinstance(ids, torch.Tensor)
            return ids

        def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
            logits = self.logits_processor(self.lm_head, hidden_states)
            if logits is None:  # not the last pipeline rank
                return None
            if self.head_logits:
                return logits
            return self.full_logits(logits, self.token_ids)

        @property
        def compute_logits_local(self) -> Any:
            # vLLM's batch-sharded sampling calls this for unscattered head logits and would sample head rows as
            # token ids; hiding it (hasattr is False) makes vLLM fall back to `compute_logits`.
            raise AttributeError("compute_logits_local: a restricted head has no vocabulary-parallel logits")

        def get_top_tokens(self, hidden_states: Tensor) -> Tensor:
            """Greedy token ids (speculative decoding's draft path): the head's argmax row, mapped to its token."""
            rows = self.logits_processor.get_top_tokens(self.lm_head, hidden_states)
            return self.token_ids[rows]

        def load_weights(self, weights: Any) -> set[str]:
            vocab_size = int(self.config.vocab_size)
            seen: list[bool] = []

            def checked() -> Any:
                for name, tensor in weights:
                    if name == TOKEN_IDS:
                        check_loaded_token_ids(tensor, self.output_vocab_rows, vocab_size)
                        seen.append(True)
                    yield name, tensor

            loaded: set[str] = super().load_weights(checked())
            if not seen:
                raise OutputVocabError(f"the checkpoint has no {TOKEN_IDS}")
            return loaded

    DistilleryTrimmedLlamaForCausalLM.__name__ = ARCHITECTURE
    DistilleryTrimmedLlamaForCausalLM.__qualname__ = ARCHITECTURE
    return DistilleryTrimmedLlamaForCausalLM


_CLASS: Any = None


def __getattr__(name: str) -> Any:
    """`DistilleryTrimmedLlamaForCausalLM`, built on first access (vLLM's lazy registration imports it by name)."""
    global _CLASS
    if name != ARCHITECTURE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _CLASS is None:
        _CLASS = _model_class()
    return _CLASS
