"""The student factory: a student pruned from the teacher (Minitron), a fresh model of a given shape, or a checkpoint.

Pruning follows Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation", arXiv:2407.14679): importance comes from activations on a few calibration sequences, in one forward
pass of the teacher —

- attention heads: L2 norm of each head's output (the input of `o_proj`), per layer; with grouped-query attention
  whole key/value groups are kept or dropped first (sum of their query heads), then query heads within a group;
- MLP neurons: magnitude of `act(gate(x)) * up(x)` (the input of `down_proj`), per layer;
- hidden (embedding) channels: magnitude of every RMSNorm output on the residual stream, summed over layers,
  because the residual stream is shared by all layers and the tied embedding / LM head;
- depth: evenly spaced layers, or block importance (ShortGPT, Men et al. 2024, arXiv:2403.03853):
  BI = 1 − cos(layer input, layer output); the layers that change the residual stream most are kept.

Aggregation over a batch is mean over sequences of the L2 norm over positions (Minitron's best "(L2, mean)").
RMSNorm weights are sliced as they are: rescaling them by the calibration estimate of rms(kept) / rms(all) made
the pruned SmolLM2 students worse (cross-entropy 9.5 → 10.7 on held-out worked solutions), so it is not done.
The student keeps the teacher's tokenizer files and chat template, so both see the same token ids.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common import pb
from services.common.errors import InvalidArgument
from services.common.models import load_causal_lm, load_tokenizer, offline
from services.common.registry import path_from_uri, verify

logger = logging.getLogger(__name__)

#: Files copied from the teacher so the student tokenizes and formats chats exactly like it.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
#: Model files of a checkpoint used as a starting point (trainer state and the manifest are left behind).
MODEL_FILES = ("config.json", "model.safetensors")
DEFAULT_CALIBRATION_SAMPLES = 64
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


def make_student(
    teacher_dir: Path,
    recipe: pb.trainer.StudentRecipe,
    out_dir: Path,
    calibration: Sequence[Sequence[int]] | None = None,
    *,
    seed: int = 0,
    dtype: str = "float32",
) -> int:
    """Writes a student as a Hugging Face safetensors folder into `out_dir`; returns its parameter count.

    `calibration`: token-id sequences for activation importance (default: `default_calibration`, worked
    solutions of the seed task in the teacher's chat format). `dtype` is the dtype of the saved weights; the
    trainer keeps float32 master weights, so that is the default.
    """
    offline()
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise ValueError(f"out_dir={str(out_dir)!r}: must be empty")
    source = recipe.WhichOneof("source")
    if source == "init_checkpoint":
        return _from_checkpoint(recipe.init_checkpoint, out_dir, dtype)
    teacher = load_causal_lm(teacher_dir, dtype=torch.float32)
    _check_architecture(teacher.config)
    if source == "config":
        shape = resolve_shape(teacher.config, recipe.config, field="student.config")
        torch.manual_seed(seed)
        model = _new_model(teacher.config, shape)
    else:
        pruned = recipe.pruned if source == "pruned" else pb.trainer.PrunedStudent()
        shape = resolve_shape(teacher.config, pruned, field="student.pruned")
        if calibration is None:
            n = pruned.calibration_samples or DEFAULT_CALIBRATION_SAMPLES
            calibration = default_calibration(load_tokenizer(teacher_dir), n)
        model = prune(teacher, shape, pruned.layer_selection, calibration)
    del teacher
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(teacher_dir, out_dir)
    count = sum(p.numel() for p in model.parameters())
    logger.info("student written", extra={"dir": str(out_dir), "parameters": count, "shape": shape.__dict__})
    return count


def _check_architecture(config: Any) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"teacher model_type={config.model_type!r}: pruning supports {SUPPORTED_MODEL_TYPES} (Llama-style blocks)"
        )


def resolve_shape(config: Any, want: Any, field: str) -> Shape:
    """The student's shape: `want`'s non-zero fields, the teacher's `config` for the rest.

    Raises InvalidArgument naming `{field}.<name>` (e.g. `spec.student.pruned.hidden_size`).
    """
    shape = Shape(
        num_layers=want.num_layers or config.num_hidden_layers,
        hidden_size=want.hidden_size or config.hidden_size,
        intermediate_size=want.intermediate_size or config.intermediate_size,
        num_attention_heads=want.num_attention_heads or config.num_attention_heads,
        num_key_value_heads=want.num_key_value_heads or config.num_key_value_heads,
    )
    if shape.hidden_size % shape.num_attention_heads:
        why = f"must be a multiple of num_attention_heads={shape.num_attention_heads}"
        raise InvalidArgument(f"{field}.hidden_size", shape.hidden_size, why)
    if shape.num_attention_heads % shape.num_key_value_heads:
        why = f"must be a multiple of num_key_value_heads={shape.num_key_value_heads}"
        raise InvalidArgument(f"{field}.num_attention_heads", shape.num_attention_heads, why)
    if field.endswith("pruned"):
        limits = {
            "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
        }
        for name, limit in limits.items():
            if getattr(shape, name) > limit:
                raise InvalidArgument(
                    f"{field}.{name}", getattr(shape, name), f"pruning cannot exceed the teacher's {limit}"
                )
        teacher_group = config.num_attention_heads // config.num_key_value_heads
        group = shape.num_attention_heads // shape.num_key_value_heads
        if group > teacher_group:
            why = f"{group} query heads per key/value head, the teacher has {teacher_group}"
            raise InvalidArgument(f"{field}.num_attention_heads", shape.num_attention_heads, why)
    return shape


def _student_config(config: Any, shape: Shape) -> Any:
    data = config.to_dict()
    for key in ("_name_or_path", "quantization_config", "auto_map"):
        data.pop(key, None)
    data.update(
        num_hidden_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        # The head size stays the teacher's so pruned heads keep their weights and attention scaling.
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    )
    return type(config).from_dict(data)


def _new_model(config: Any, shape: Shape) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(_student_config(config, shape))


def default_calibration(tokenizer: Any, n: int, seed: int = 1234) -> list[list[int]]:
    """`n` seed-task conversations (system, question, worked solution) in the teacher's chat format, as token ids."""
    from services.tasks import get_task

    task = get_task("math_word_problems")
    problems = []
    for difficulty in (1, 2, 3, 4):
        problems += task.generate((n + 3) // 4, seed=seed, split="train", difficulty=difficulty)
    out = []
    for problem in problems[:n]:
        chat = [*task.messages(problem), {"role": "assistant", "content": problem.solution}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


def copy_tokenizer(teacher_dir: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, out_dir / name)


def _from_checkpoint(uri: str, out_dir: Path, dtype: str) -> int:
    """Copies the model and tokenizer files of a verified registry checkpoint (or a plain safetensors folder)."""
    path = path_from_uri(uri)
    if (path / "manifest.json").is_file():
        verify(path)  # raises CheckpointError on a wrong sha256 or a pickle file
    else:
        from services.common.models import check_safe_folder

        check_safe_folder(path)
    from services.common.models import parameter_count

    for name in (*MODEL_FILES, *TOKENIZER_FILES):
        if (path / name).is_file():
            shutil.copy2(path / name, out_dir / name)
    if dtype != json.loads((out_dir / "config.json").read_text()).get("dtype", dtype):
        import torch

        model = load_causal_lm(out_dir, dtype=getattr(torch, dtype))
        model.config.dtype = dtype
        (out_dir / "model.safetensors").unlink()
        model.save_pretrained(out_dir, safe_serialization=True)
    return parameter_count(out_dir)


# --- pruning -------------------------------------------------------------------------------------------------


@dataclass
class Importance:
    """Activation statistics of one calibration pass over the teacher."""

    layers: Any  # (L,) block importance, 1 - cos(in, out)
    heads: Any  # (L, H) per query head
    neurons: Any  # (L, I) per MLP neuron
    channels: Any  # (L, C) per hidden channel, from both RMSNorms of each layer
    final_channels: Any  # (C,) from the final norm


def measure_importance(model: Any, calibration: Sequence[Sequence[int]], batch_size: int = 8) -> Importance:
    """One forward pass over `calibration` with hooks; every statistic is masked to real (non-pad) tokens."""
    import torch

    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = model.model.layers
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    acc = {
        "bi": torch.zeros(n_layers, dtype=torch.float64),
        "heads": torch.zeros(n_layers, n_heads, dtype=torch.float64),
        "neurons": torch.zeros(n_layers, inter, dtype=torch.float64),
        "channels": torch.zeros(n_layers, hidden, dtype=torch.float64),
        "final": torch.zeros(hidden, dtype=torch.float64),
    }
    state: dict[str, Any] = {}

    def seq_l2(x: Any) -> Any:
        # x: (B, S, ...) → (...) : L2 over real positions of each sequence, then summed over the batch.
        m = state["mask"].view(*state["mask"].shape, *([1] * (x.dim() - 2)))
        return (x.float().pow(2) * m).sum(1).sqrt().sum(0).double()

    hooks = []
    for i, layer in enumerate(layers):

        def layer_hook(mod: Any, args: Any, kwargs: Any, out: Any, i: int = i) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, S)
            acc["bi"][i] += ((1 - cos) * state["mask"]).sum().double()

        def o_proj_hook(mod: Any, args: Any, i: int = i) -> None:
            x = args[0]  # (B, S, H * D)
            acc["heads"][i] += seq_l2(x.view(*x.shape[:2], n_heads, head_dim).float().norm(dim=-1))

        def down_hook(mod: Any, args: Any, i: int = i) -> None:
            acc["neurons"][i] += seq_l2(args[0])  # (B, S, I)

        def norm_hook(mod: Any, args: Any, out: Any, i: int = i) -> None:
            acc["channels"][i] += seq_l2(out)  # (B, S, C)

        hooks += [
            layer.register_forward_hook(layer_hook, with_kwargs=True),
            layer.self_attn.o_proj.register_forward_pre_hook(o_proj_hook),
            layer.mlp.down_proj.register_forward_pre_hook(down_hook),
            layer.input_layernorm.register_forward_hook(norm_hook),
            layer.post_attention_layernorm.register_forward_hook(norm_hook),
        ]

    def final_hook(mod: Any, args: Any, out: Any) -> None:
        acc["final"] += seq_l2(out)

    hooks.append(model.model.norm.register_forward_hook(final_hook))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, len(calibration), batch_size):
                chunk = [list(s) for s in calibration[start : start + batch_size] if len(s)]
                if not chunk:
                    continue
                width = max(len(s) for s in chunk)
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
                state["mask"] = mask.float()
                tokens += int(mask.sum())
                model.model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    if tokens == 0:
        raise ValueError("calibration: no tokens")
    return Importance(
        layers=acc["bi"] / tokens,
        heads=acc["heads"],
        neurons=acc["neurons"],
        channels=acc["channels"],
        final_channels=acc["final"],
    )


def select_layers(n_layers: int, keep: int, selection: int, block_importance: Any = None) -> list[int]:
    """Indices of the teacher layers the student keeps, ascending."""
    if keep >= n_layers:
        return list(range(n_layers))
    if selection == pb.trainer.LAYER_SELECTION_IMPORTANCE:
        order = sorted(range(n_layers), key=lambda i: -float(block_importance[i]))
        return sorted(order[:keep])
    if keep == 1:
        return [n_layers - 1]
    # Evenly spaced, always keeping the first and the last layer (they matter most, ShortGPT / Minitron).
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


def _top(scores: Any, k: int) -> Any:
    """Indices of the `k` largest scores, in their original order (keeps the weight layout stable)."""
    import torch

    return torch.sort(torch.topk(scores, k).indices).values


def prune(model: Any, shape: Shape, selection: int, calibration: Sequence[Sequence[int]]) -> Any:
    """A smaller model of `shape` initialised from `model`'s weights (Minitron width + depth pruning)."""
    import torch

    cfg = model.config
    needs_stats = (
        selection == pb.trainer.LAYER_SELECTION_IMPORTANCE
        or shape.hidden_size < cfg.hidden_size
        or shape.intermediate_size < cfg.intermediate_size
        or shape.num_attention_heads < cfg.num_attention_heads
    )
    imp = measure_importance(model, calibration) if needs_stats else None
    kept_layers = select_layers(
        cfg.num_hidden_layers, shape.num_layers, selection, imp.layers if imp is not None else None
    )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group_t = cfg.num_attention_heads // cfg.num_key_value_heads
    group_s = shape.num_attention_heads // shape.num_key_value_heads

    if imp is not None and shape.hidden_size < cfg.hidden_size:
        channel_scores = imp.channels[kept_layers].sum(0) + imp.final_channels
        channels = _top(channel_scores, shape.hidden_size)
    else:
        channels = torch.arange(cfg.hidden_size)

    student = _new_model(cfg, shape)
    src, dst = model.model, student.model
    with torch.no_grad():
        dst.embed_tokens.weight.copy_(src.embed_tokens.weight[:, channels])
        if not cfg.tie_word_embeddings:
            student.lm_head.weight.copy_(model.lm_head.weight[:, channels])
        for j, i in enumerate(kept_layers):
            s, d = src.layers[i], dst.layers[j]
            # Heads: whole key/value groups first (by the summed importance of their query heads), then the
            # most important query heads inside each kept group; query head h uses key/value head h // group.
            if imp is not None and shape.num_attention_heads < cfg.num_attention_heads:
                per_head = imp.heads[i].view(cfg.num_key_value_heads, group_t)
                groups = _top(per_head.sum(1), shape.num_key_value_heads)
                heads = torch.cat([g * group_t + _top(per_head[g], group_s) for g in groups.tolist()])
            else:
                groups = torch.arange(cfg.num_key_value_heads)
                heads = torch.arange(cfg.num_attention_heads)
            q_rows = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                sp, dp = getattr(s.self_attn, name), getattr(d.self_attn, name)
                dp.weight.copy_(sp.weight[rows][:, channels])
                if sp.bias is not None:
                    dp.bias.copy_(sp.bias[rows])
            d.self_attn.o_proj.weight.copy_(s.self_attn.o_proj.weight[channels][:, q_rows])
            if s.self_attn.o_proj.bias is not None:
                d.self_attn.o_proj.bias.copy_(s.self_attn.o_proj.bias[channels])
            if imp is not None and shape.intermediate_size < cfg.intermediate_size:
                neurons = _top(imp.neurons[i], shape.intermediate_size)
            else:
                neurons = torch.arange(cfg.intermediate_size)
            d.mlp.gate_proj.weight.copy_(s.mlp.gate_proj.weight[neurons][:, channels])
            d.mlp.up_proj.weight.copy_(s.mlp.up_proj.weight[neurons][:, channels])
            d.mlp.down_proj.weight.copy_(s.mlp.down_proj.weight[channels][:, neurons])
            d.input_layernorm.weight.copy_(s.input_layernorm.weight[channels])
            d.post_attention_layernorm.weight.copy_(s.post_attention_layernorm.weight[channels])
        dst.norm.weight.copy_(src.norm.weight[channels])
    logger.info(
        "pruned the teacher",
        extra={"layers": kept_layers, "shape": shape.__dict__, "calibration_sequences": len(calibration)},
    )
    return student
