"""The student factory: a recipe becomes a student pruned from the teacher, a fresh model of a shape, or a checkpoint.

Pruning (Minitron, arXiv:2407.14679; ShortGPT block importance, arXiv:2403.03853) lives in `pruning.py`, which
reads the teacher's safetensors a layer at a time; this module translates the recipe (protobuf) into its terms and
validates the shape. A fresh model reads only the teacher's config. The student keeps the teacher's tokenizer
files and chat template, so both see the same token ids.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.common import outvocab, pb
from services.common.errors import InvalidArgument
from services.common.models import check_safe_folder, load_causal_lm, offline, parameter_count
from services.common.registry import path_from_uri, verify
from services.trainer import pruning
from services.trainer.pruning import Shape

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

__all__ = ["Shape", "copy_tokenizer", "make_student", "resolve_shape"]


def make_student(
    teacher_dir: Path,
    recipe: pb.trainer.StudentRecipe,
    out_dir: Path,
    calibration: Sequence[Sequence[int]] | None = None,
    *,
    seed: int = 0,
    dtype: str = "float32",
    output_vocab: Sequence[int] | None = None,
) -> int:
    """Writes a student as a Hugging Face safetensors folder into `out_dir`; returns its parameter count.

    `calibration`: token-id sequences (e.g. the run's own prompts in the teacher's chat format) for activation
    importance; required when the pruned recipe ranks anything by importance (layer_selection=importance or any
    width pruning), all of them are used. `dtype` is the dtype of the saved weights; the trainer keeps float32
    master weights, so that is the default. `output_vocab`: token ids the student's LM head keeps (a restricted
    output vocabulary, `services.common.outvocab`); a checkpoint that already has a restricted head keeps its own.
    """
    offline()
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise ValueError(f"out_dir={str(out_dir)!r}: must be empty")
    source = recipe.WhichOneof("source")
    if source == "init_checkpoint":
        count = _from_checkpoint(recipe.init_checkpoint, out_dir, dtype)
        return _restrict_head(out_dir, output_vocab) if output_vocab is not None else count
    check_safe_folder(teacher_dir)
    config = pruning.load_config(teacher_dir)
    if source == "config":
        shape = resolve_shape(config, recipe.config, field="student.config")
        count = _fresh(config, shape, out_dir, seed, dtype)
    else:
        pruned = recipe.pruned if source == "pruned" else pb.trainer.PrunedStudent()
        pruning.check_supported(config)  # before the shape: other families may lack the fields it reads
        shape = resolve_shape(config, pruned, field="student.pruned")
        selection = (
            pruning.IMPORTANCE if pruned.layer_selection == pb.trainer.LAYER_SELECTION_IMPORTANCE else pruning.EVENLY
        )
        if calibration is None and pruning.needs_statistics(config, shape, selection):
            raise ValueError(
                "calibration: this recipe ranks layers, heads, neurons or channels by importance "
                "(layer_selection=importance or a narrower width) and needs token-id calibration sequences"
            )
        count = pruning.prune(teacher_dir, shape, selection, calibration, out_dir, dtype=dtype).parameters
    if output_vocab is not None:
        count = _restrict_head(out_dir, output_vocab)
    copy_tokenizer(teacher_dir, out_dir)
    logger.info("student written", extra={"dir": str(out_dir), "parameters": count, "shape": shape.__dict__})
    return count


def _restrict_head(out_dir: Path, token_ids: Sequence[int]) -> int:
    """Rewrites the student in `out_dir` with its LM head restricted to `token_ids` (unless it already has a
    restricted head); returns its parameter count."""
    if outvocab.is_trimmed(json.loads((out_dir / "config.json").read_text())):
        return parameter_count(out_dir)
    model = load_causal_lm(out_dir)
    trimmed = outvocab.trim_model(model, token_ids)
    (out_dir / "model.safetensors").unlink()
    trimmed.save_pretrained(out_dir, safe_serialization=True)
    logger.info("output vocabulary restricted", extra={"dir": str(out_dir), "rows": len(token_ids),
                                                       "vocab_size": int(model.config.vocab_size)})  # fmt: skip
    return sum(p.numel() for p in trimmed.parameters())


def _fresh(config: Any, shape: Shape, out_dir: Path, seed: int, dtype: str) -> int:
    """A randomly initialised model of the teacher's family and `shape` (nothing of the teacher's weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # float32 init whatever the teacher's stored dtype (from_config would otherwise use config.dtype).
    model = AutoModelForCausalLM.from_config(pruning.student_config(config, shape), dtype=torch.float32)
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


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
    # A student is never larger than its teacher in any dimension, pruned or freshly initialised: anything else is
    # not distillation, and a caller could otherwise ask for 65,536 layers.
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
                f"{field}.{name}", getattr(shape, name), f"a student cannot exceed the teacher's {limit}"
            )
    if field.endswith("pruned"):
        teacher_group = config.num_attention_heads // config.num_key_value_heads
        group = shape.num_attention_heads // shape.num_key_value_heads
        if group > teacher_group:
            why = f"{group} query heads per key/value head, the teacher has {teacher_group}"
            raise InvalidArgument(f"{field}.num_attention_heads", shape.num_attention_heads, why)
    return shape


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
        check_safe_folder(path)
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
