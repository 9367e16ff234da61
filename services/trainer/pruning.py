"""Minitron pruning without materialising the teacher: statistics layer by layer, the student sliced from the file.

Pruning follows Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation", arXiv:2407.14679): importance comes from activations on a few calibration sequences —

- attention heads: L2 norm of each head's output (the input of `o_proj`), per layer; with grouped-query attention
  whole key/value groups are kept or dropped first (sum of their query heads), then query heads within a group;
- MLP neurons: magnitude of `act(gate(x)) * up(x)` (the input of `down_proj`), per layer;
- hidden (embedding) channels: magnitude of every RMSNorm output on the residual stream, summed over the kept
  layers and the final norm, because the residual stream is shared by all layers and the embedding / LM head;
- depth: evenly spaced layers, or block importance (ShortGPT, Men et al. 2024, arXiv:2403.03853):
  BI = 1 − cos(layer input, layer output); the layers that change the residual stream most are kept.

Aggregation over sequences is the mean over sequences of the L2 norm over positions (Minitron's best "(L2, mean)";
the sum is kept, the mean's 1/n does not change any ranking). RMSNorm weights are sliced as they are: rescaling
them by rms(kept) / rms(all) made pruned SmolLM2 students worse (cross-entropy 9.5 → 10.7), so it is not done.

Memory: the teacher is never loaded whole. Its safetensors are read lazily (`safe_open`), one tensor at a time in
its stored dtype. The calibration pass is sequential, as in GPTQ (Frantar et al. 2023, arXiv:2210.17323): the
hidden states of all calibration sequences are kept between layers while each decoder layer is read once, upcast
to float32, run over every sequence and dropped. Peak ≈ one fp32 teacher layer + the calibration activations +
the embedding, then the student; writing it reads only the kept layers' tensors.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.models import check_safe_folder, offline

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
EVENLY = "evenly"
IMPORTANCE = "importance"
#: Calibration sequences per forward; only the activations of one batch inside one layer are alive at a time.
CALIBRATION_BATCH = 8
#: Per kept module of a decoder layer: which index picks its weight's (rows, columns); a bias takes the rows.
_SLICES = {
    "self_attn.q_proj": ("q", "c"),
    "self_attn.k_proj": ("kv", "c"),
    "self_attn.v_proj": ("kv", "c"),
    "self_attn.o_proj": ("c", "q"),
    "mlp.gate_proj": ("n", "c"),
    "mlp.up_proj": ("n", "c"),
    "mlp.down_proj": ("c", "n"),
    "input_layernorm": ("c",),
    "post_attention_layernorm": ("c",),
}


@dataclass(frozen=True)
class Shape:
    """A student's decoder shape; the head size stays the teacher's."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass
class Importance:
    """Activation statistics of one calibration pass over the teacher (L layers, H query heads, I, C)."""

    layers: Tensor  # (L,) block importance: mean over real tokens of 1 − cos(layer input, layer output)
    heads: Tensor  # (L, H) Σ over sequences of the L2 over positions of each head's output norm
    neurons: Tensor  # (L, I) the same for each MLP neuron (down_proj input)
    channels: Tensor  # (L, C) the same for each hidden channel, both RMSNorm outputs of the layer added
    final_channels: Tensor  # (C,) the same for the final RMSNorm output


@dataclass(frozen=True)
class Pruned:
    parameters: int  # tied embeddings counted once
    layers: list[int]  # the teacher layers kept, ascending


class TeacherWeights:
    """Lazy read-only access to a folder's safetensors: one file, or shards listed in model.safetensors.index.json.

    `get` reads one tensor in its stored dtype. Each read opens (memory-maps) its file and closes it again: the
    mapped pages a read touches count towards the process's resident memory while the file stays mapped, so a
    long-lived mapping would end up holding the whole teacher by the end of the calibration pass.
    """

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            where: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        else:
            where = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        where.setdefault(key, file.name)
        self.folder = folder
        self._where = where

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def get(self, name: str) -> Tensor:
        from safetensors import safe_open

        if name not in self._where:
            raise ValueError(f"{self.folder}: its safetensors have no tensor {name!r}")
        with safe_open(str(self.folder / self._where[name]), framework="pt") as f:
            tensor: Tensor = f.get_tensor(name)  # a copy: it outlives the mapping
        return tensor


def load_config(folder: Path) -> Any:
    """The model's transformers config (offline, no remote code); no weights are read."""
    offline()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)


def check_supported(config: Any) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"teacher model_type={config.model_type!r}: pruning supports {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Llama-style blocks); use --student with an explicit shape instead (StudentRecipe.config: a fresh "
            "model of the teacher's family)"
        )


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def needs_statistics(config: Any, shape: Shape, selection: str) -> bool:
    """Whether pruning to `shape` ranks anything by importance (and so needs calibration sequences)."""
    return (
        selection == IMPORTANCE
        or shape.hidden_size < config.hidden_size
        or shape.intermediate_size < config.intermediate_size
        or shape.num_attention_heads < config.num_attention_heads
    )


def student_config(config: Any, shape: Shape, layers: Sequence[int] | None = None) -> Any:
    """The teacher's config resized to `shape`; `layers`: the teacher layers kept (their per-layer types follow)."""
    data = config.to_dict()
    for key in ("_name_or_path", "quantization_config", "auto_map"):
        data.pop(key, None)
    if data.get("layer_types") is not None:
        # Per-layer attention types (sliding or full, qwen2/mistral) must list exactly num_hidden_layers entries.
        if layers is None:
            data.pop("layer_types")  # a fresh model: the config derives them again
        else:
            data["layer_types"] = [data["layer_types"][i] for i in layers]
    data.update(
        num_hidden_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        # The head size stays the teacher's so pruned heads keep their weights and attention scaling.
        head_dim=head_dim(config),
    )
    return type(config).from_dict(data)


def skeleton(config: Any) -> Any:
    """A causal LM of `config`'s architecture on the meta device: module structure and names, no storage."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        # sdpa with no mask is causal: right-padded real tokens never attend to the pads after them.
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32, attn_implementation="sdpa")


@contextmanager
def materialised(module: Any, weights: TeacherWeights, prefix: str) -> Iterator[Any]:
    """A meta `module` with its tensors read from the file and upcast to float32; back on meta afterwards."""
    state = {name: weights.get(prefix + name).float() for name in module.state_dict()}
    module.load_state_dict(state, assign=True)
    del state
    try:
        yield module
    finally:
        module.to_empty(device="meta")


def _batches(calibration: Sequence[Sequence[int]], config: Any, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Right-padded (ids (B, S) long, mask (B, S) float) batches of similar lengths."""
    import torch

    # The pass runs full causal attention: beyond a sliding window that would differ from the teacher.
    window = getattr(config, "sliding_window", None) or None
    seqs = [[int(t) for t in s][:window] for s in calibration if len(s)]
    if not seqs:
        raise ValueError("calibration: no tokens (give token-id sequences of the task's prompts)")
    bad = next((t for s in seqs for t in s if not 0 <= t < config.vocab_size), None)
    if bad is not None:
        raise ValueError(f"calibration: token id {bad} is outside the teacher's vocabulary of {config.vocab_size}")
    seqs.sort(key=len, reverse=True)  # similar lengths share a batch: less padding to compute
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids = torch.zeros(len(chunk), len(chunk[0]), dtype=torch.long)
        mask = torch.zeros(len(chunk), len(chunk[0]))
        for b, s in enumerate(chunk):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1.0
        out.append((ids, mask))
    return out


def _seq_l2(x: Tensor, mask: Tensor) -> Tensor:
    """(B, S, ...) → (...) float64: L2 over the real positions of each sequence, summed over sequences."""
    m = mask.view(*mask.shape, *([1] * (x.dim() - 2)))
    return (x.float().pow(2) * m).sum(1).sqrt().double().sum(0)


def measure_importance(
    teacher_dir: Path, calibration: Sequence[Sequence[int]], batch_size: int = CALIBRATION_BATCH
) -> Importance:
    """Minitron activation importance and ShortGPT block importance, one teacher layer in memory at a time.

    `calibration`: token-id sequences. Every statistic is masked to real (non-pad) tokens.
    """
    import torch

    offline()
    check_safe_folder(teacher_dir)
    config = load_config(teacher_dir)
    check_supported(config)
    batches = _batches(calibration, config, batch_size)
    n_layers, n_heads, hd = config.num_hidden_layers, config.num_attention_heads, head_dim(config)
    acc = {
        "bi": torch.zeros(n_layers, dtype=torch.float64),
        "heads": torch.zeros(n_layers, n_heads, dtype=torch.float64),
        "neurons": torch.zeros(n_layers, config.intermediate_size, dtype=torch.float64),
        "channels": torch.zeros(n_layers, config.hidden_size, dtype=torch.float64),
        "final": torch.zeros(config.hidden_size, dtype=torch.float64),
    }
    mask: Tensor = batches[0][1]
    model = skeleton(config)
    rotary = type(model.model.rotary_emb)(config)  # on the CPU: its inverse frequencies are computed, not stored

    # The hooks add into layer `i`'s row, masked by the current batch's `mask` (both set by the loop below).
    def on_heads(mod: Any, args: Any) -> None:  # o_proj input (B, S, H·D) → per-head norm (B, S, H)
        acc["heads"][i] += _seq_l2(args[0].view(*args[0].shape[:2], n_heads, hd).float().norm(dim=-1), mask)

    def on_neurons(mod: Any, args: Any) -> None:  # down_proj input (B, S, I)
        acc["neurons"][i] += _seq_l2(args[0], mask)

    def on_norm(mod: Any, args: Any, out: Any) -> None:  # RMSNorm output (B, S, C)
        acc["channels"][i] += _seq_l2(out, mask)

    weights = TeacherWeights(teacher_dir)
    with torch.no_grad():
        embed = weights.get("model.embed_tokens.weight")  # (V, C), stored dtype
        hidden = [embed[ids].float() for ids, _ in batches]  # (B, S, C) each, kept across layers
        del embed
        rope = [rotary(h, torch.arange(h.shape[1])[None]) for h in hidden]  # (cos, sin), (1, S, D) each
        for i, layer in enumerate(model.model.layers):
            hooks = [
                layer.self_attn.o_proj.register_forward_pre_hook(on_heads),
                layer.mlp.down_proj.register_forward_pre_hook(on_neurons),
                layer.input_layernorm.register_forward_hook(on_norm),
                layer.post_attention_layernorm.register_forward_hook(on_norm),
            ]
            with materialised(layer, weights, f"model.layers.{i}."):
                for b, (_, mask) in enumerate(batches):
                    out = layer(hidden[b], attention_mask=None, position_embeddings=rope[b], use_cache=False)
                    out = out[0] if isinstance(out, tuple) else out
                    cos = torch.nn.functional.cosine_similarity(hidden[b], out, dim=-1)  # (B, S)
                    acc["bi"][i] += ((1 - cos) * mask).sum().double()
                    hidden[b] = out
            for hook in hooks:
                hook.remove()
        with materialised(model.model.norm, weights, "model.norm.") as norm:
            for b, (_, mask) in enumerate(batches):
                acc["final"] += _seq_l2(norm(hidden[b]), mask)
    tokens = sum(float(m.sum()) for _, m in batches)
    return Importance(
        layers=acc["bi"] / tokens,
        heads=acc["heads"],
        neurons=acc["neurons"],
        channels=acc["channels"],
        final_channels=acc["final"],
    )


def select_layers(n_layers: int, keep: int, selection: str, block_importance: Any = None) -> list[int]:
    """Indices of the teacher layers the student keeps, ascending."""
    if keep >= n_layers:
        return list(range(n_layers))
    if selection == IMPORTANCE:
        order = sorted(range(n_layers), key=lambda i: -float(block_importance[i]))
        return sorted(order[:keep])
    if keep == 1:
        return [n_layers - 1]
    # Evenly spaced, always keeping the first and the last layer (they matter most, ShortGPT / Minitron).
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the `k` largest scores, in their original order (keeps the weight layout stable)."""
    import torch

    return torch.sort(torch.topk(scores, k).indices).values


def _layer_indices(config: Any, shape: Shape, layer: int, imp: Importance | None) -> dict[str, Tensor]:
    """Rows kept of one teacher layer: q/kv (query and key/value projection rows) and n (MLP neurons)."""
    import torch

    hd = head_dim(config)
    group_t = config.num_attention_heads // config.num_key_value_heads
    group_s = shape.num_attention_heads // shape.num_key_value_heads
    if imp is not None and shape.num_attention_heads < config.num_attention_heads:
        # Whole key/value groups first (by the summed importance of their query heads), then the most important
        # query heads inside each kept group; query head h uses key/value head h // group.
        per_head = imp.heads[layer].view(config.num_key_value_heads, group_t)
        groups = _top(per_head.sum(1), shape.num_key_value_heads)
        heads = torch.cat([g * group_t + _top(per_head[g], group_s) for g in groups.tolist()])
    else:
        groups = torch.arange(config.num_key_value_heads)
        heads = torch.arange(config.num_attention_heads)
    if imp is not None and shape.intermediate_size < config.intermediate_size:
        neurons = _top(imp.neurons[layer], shape.intermediate_size)
    else:
        neurons = torch.arange(config.intermediate_size)
    return {
        "q": (heads[:, None] * hd + torch.arange(hd)).reshape(-1),
        "kv": (groups[:, None] * hd + torch.arange(hd)).reshape(-1),
        "n": neurons,
    }


def prune(
    teacher_dir: Path,
    shape: Shape,
    selection: str,
    calibration: Sequence[Sequence[int]] | None,
    out_dir: Path,
    *,
    dtype: str = "float32",
) -> Pruned:
    """Writes a student of `shape` sliced from the teacher's weights into `out_dir` (model.safetensors + config).

    `selection`: EVENLY or IMPORTANCE. `calibration` (token-id sequences) is required when anything is ranked by
    importance (see `needs_statistics`). `dtype`: the saved weights' dtype.
    """
    import torch
    from safetensors.torch import save_file

    offline()
    check_safe_folder(teacher_dir)
    config = load_config(teacher_dir)
    check_supported(config)
    imp = None
    if needs_statistics(config, shape, selection):
        if not calibration:
            raise ValueError(
                "calibration: token-id sequences are required to rank layers, heads, neurons or channels by "
                "importance (layer_selection=importance or any width pruning); none were given"
            )
        imp = measure_importance(teacher_dir, calibration)
    kept = select_layers(config.num_hidden_layers, shape.num_layers, selection, imp.layers if imp else None)
    if imp is not None and shape.hidden_size < config.hidden_size:
        channels = _top(imp.channels[kept].sum(0) + imp.final_channels, shape.hidden_size)
    else:
        channels = torch.arange(config.hidden_size)
    target = getattr(torch, dtype)
    s_config = student_config(config, shape, kept)
    expected = {name: tuple(t.shape) for name, t in skeleton(s_config).state_dict().items()}
    if s_config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    rows = {j: _layer_indices(config, shape, i, imp) | {"c": channels} for j, i in enumerate(kept)}
    tensors: dict[str, Tensor] = {}
    weights = TeacherWeights(teacher_dir)
    for name in expected:  # only the kept layers' tensors are read
        source, index = _source(name, kept, rows, channels)
        t = weights.get(source)
        for dim, idx in enumerate(index):
            if idx is not None:
                t = t.index_select(dim, idx)
        tensors[name] = t.to(target).contiguous()
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != expected:
        wrong = sorted(n for n in expected if got.get(n) != expected[n])
        raise ValueError(f"teacher {config.model_type!r}: sliced tensors do not fit the student's shapes: {wrong[:5]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    s_config.dtype = dtype
    s_config.save_pretrained(out_dir)
    count = sum(t.numel() for t in tensors.values())
    logger.info("pruned the teacher", extra={"layers": kept, "shape": shape.__dict__, "parameters": count})
    return Pruned(parameters=count, layers=kept)


def _source(
    name: str, kept: Sequence[int], rows: dict[int, dict[str, Tensor]], channels: Tensor
) -> tuple[str, tuple[Tensor | None, ...]]:
    """The teacher tensor a student tensor comes from, and the indices it keeps per dimension (None: all)."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return name, (None, channels)  # the vocabulary is never pruned
    if name == "model.norm.weight":
        return name, (channels,)
    parts = name.split(".")
    module, kind = ".".join(parts[3:-1]), parts[-1]
    if parts[:2] != ["model", "layers"] or module not in _SLICES or kind not in ("weight", "bias"):
        raise ValueError(f"student tensor {name!r}: not part of a Llama-style block; pruning cannot fill it")
    j = int(parts[2])
    dims = _SLICES[module] if kind == "weight" else _SLICES[module][:1]
    return f"model.layers.{kept[j]}.{module}.{kind}", tuple(rows[j][d] for d in dims)
