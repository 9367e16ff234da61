"""The student factory: recipes become the right students, with the teacher's tokenizer; bad inputs fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.common import pb
from services.common.models import load_causal_lm, load_tokenizer, parameter_count
from services.common.registry import CheckpointError, Registry
from services.trainer import student as st
from services.trainer.recipes import DEFAULT_STUDENT_RECIPE, DEFAULT_TASK, default_run_spec, with_defaults


def _pruned(**kw: int) -> pb.trainer.StudentRecipe:
    return pb.trainer.StudentRecipe(pruned=pb.trainer.PrunedStudent(**kw))


def _calibration(teacher: Path, n: int = 8) -> list[list[int]]:
    """Short chats in the teacher's chat format, as token ids (what the trainer builds from a run's prompts)."""
    tok = load_tokenizer(teacher)
    out = []
    for i in range(n):
        chat = [
            {"role": "user", "content": f"Sam has {i + 3} apples and buys {2 * i + 1} more. How many now?"},
            {"role": "assistant", "content": f"{i + 3} + {2 * i + 1} = {3 * i + 4}. The answer is {3 * i + 4}."},
        ]
        ids = tok.apply_chat_template(chat, tokenize=True)
        out.append(list(ids if isinstance(ids, list) else ids["input_ids"]))
    return out


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_causal_lm(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def test_pruned_student_has_the_shape_tokenizer_and_parameter_count(tiny_teacher: Path, tmp_path: Path) -> None:
    recipe = _pruned(
        num_layers=2,
        layer_selection=pb.trainer.LAYER_SELECTION_IMPORTANCE,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        calibration_samples=8,
    )
    count = st.make_student(tiny_teacher, recipe, tmp_path / "s", _calibration(tiny_teacher))
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 32, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 32)
    assert count == parameter_count(tmp_path / "s")
    assert count < parameter_count(tiny_teacher) / 2
    # Same tokenizer and chat template as the teacher.
    chat = [{"role": "user", "content": "Sam has 3 apples."}]
    t_ids = load_tokenizer(tiny_teacher).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    s_ids = load_tokenizer(tmp_path / "s").apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert t_ids == s_ids
    assert (tmp_path / "s" / "tokenizer.json").read_bytes() == (tiny_teacher / "tokenizer.json").read_bytes()
    logits = _logits(tmp_path / "s", torch.tensor([[1, 5, 9, 12]]))
    assert logits.shape == (1, 4, config["vocab_size"]) and torch.isfinite(logits).all()


def test_pruning_drops_the_heads_and_neurons_that_do_nothing(tiny_teacher: Path, tmp_path: Path) -> None:
    """Silence key/value group 1 and half the MLP neurons: pruning them away must not change the outputs."""
    teacher = load_causal_lm(tiny_teacher, dtype=torch.float32)
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.v_proj.weight[32:64] = 0  # kv group 1 (query heads 2, 3) outputs zeros
            layer.mlp.up_proj.weight[::2] = 0  # even neurons output zeros
    silenced = tmp_path / "silenced"
    teacher.save_pretrained(silenced)
    st.copy_tokenizer(tiny_teacher, silenced)
    recipe = _pruned(intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, calibration_samples=8)
    st.make_student(silenced, recipe, tmp_path / "s", _calibration(tiny_teacher))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 2]])
    torch.testing.assert_close(_logits(tmp_path / "s", ids), _logits(silenced, ids), rtol=1e-4, atol=1e-4)


def test_full_size_recipe_reproduces_the_teacher(tiny_teacher: Path, tmp_path: Path) -> None:
    st.make_student(tiny_teacher, _pruned(), tmp_path / "s")
    ids = torch.tensor([[1, 7, 8, 9]])
    torch.testing.assert_close(_logits(tmp_path / "s", ids), _logits(tiny_teacher, ids))


def test_explicit_shape_is_random_init_with_teacher_vocab(tiny_teacher: Path, tmp_path: Path) -> None:
    shape = pb.trainer.StudentShape(
        num_layers=1, hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1
    )
    # The teacher's weights are never read for a fresh model: a teacher folder with unreadable weights will do.
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (teacher / name).write_bytes((tiny_teacher / name).read_bytes())
    (teacher / "model.safetensors").write_bytes(b"not read")
    count = st.make_student(teacher, pb.trainer.StudentRecipe(config=shape), tmp_path / "s")
    assert count == parameter_count(tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["vocab_size"], config["dtype"]) == (1, 512, "float32")
    assert (tmp_path / "s" / "tokenizer.json").is_file()


def test_pruning_by_importance_needs_calibration(tiny_teacher: Path, tmp_path: Path) -> None:
    recipe = _pruned(num_layers=2, layer_selection=pb.trainer.LAYER_SELECTION_IMPORTANCE)
    with pytest.raises(ValueError, match=r"^calibration: "):
        st.make_student(tiny_teacher, recipe, tmp_path / "a")
    with pytest.raises(ValueError, match=r"^calibration: "):
        st.make_student(tiny_teacher, _pruned(hidden_size=64), tmp_path / "b")
    # Depth-only evenly spaced pruning ranks nothing: no calibration needed.
    assert st.make_student(tiny_teacher, _pruned(num_layers=2), tmp_path / "c") < parameter_count(tiny_teacher)


def test_unsupported_teacher_family_points_to_an_explicit_shape(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import GPT2Config

    teacher = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(teacher)
    save_file({"wte.weight": torch.zeros(4, 32)}, str(teacher / "model.safetensors"))
    with pytest.raises(ValueError, match=r"pruning supports llama, mistral, qwen2.*--student"):
        st.make_student(teacher, _pruned(num_layers=1), tmp_path / "s")


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"hidden_size": 256}, "student.pruned.hidden_size"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "student.pruned.num_attention_heads"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "student.pruned.hidden_size"),
    ],
)
def test_bad_shapes_name_the_field(tiny_teacher: Path, tmp_path: Path, kw: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        st.make_student(tiny_teacher, _pruned(**kw), tmp_path / "s")


def test_init_checkpoint_is_verified(tiny_teacher: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    staged = registry.staging_dir()
    st.make_student(tiny_teacher, _pruned(num_layers=1), staged)
    ckpt = registry.write(staged, run_id="r", step=1, parameter_count=1)
    recipe = pb.trainer.StudentRecipe(init_checkpoint=ckpt.uri)
    assert st.make_student(tiny_teacher, recipe, tmp_path / "ok") == parameter_count(ckpt.path)
    (ckpt.path / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match=r"sha256|bytes"):
        st.make_student(tiny_teacher, recipe, tmp_path / "bad")


def test_default_recipe_is_at_least_7_5x_smaller_than_the_default_teacher_shape() -> None:
    """Counted from the shapes (no teacher needed): SmolLM2-135M vs the default pruned student."""

    def count(layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int = 49152, hd: int = 64) -> int:
        attn = hidden * heads * hd * 2 + hidden * kv * hd * 2
        return vocab * hidden + hidden + layers * (attn + 3 * hidden * inter + 2 * hidden)

    p = DEFAULT_STUDENT_RECIPE.pruned
    teacher = count(30, 576, 1536, 9, 3)
    student = count(p.num_layers, p.hidden_size, p.intermediate_size, p.num_attention_heads, p.num_key_value_heads)
    assert teacher == 134_515_008
    assert teacher / student >= 7.5


def test_with_defaults_fills_only_what_is_unset() -> None:
    spec = pb.trainer.RunSpec(loss=pb.trainer.LossSpec(reverse_kl=1.0), schedule=pb.trainer.Schedule(batch_size=4))
    spec.schedule.warmup_steps = 0
    full = with_defaults(spec)
    assert full.loss.reverse_kl == 1.0 and full.loss.forward_kl == 0.0 and full.loss.HasField("temperature")
    assert full.schedule.batch_size == 4 and full.schedule.warmup_steps == 0
    assert full.schedule.learning_rate == default_run_spec().schedule.learning_rate
    assert full.student == DEFAULT_STUDENT_RECIPE and full.task == DEFAULT_TASK
