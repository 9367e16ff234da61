"""Lean pruning equals the in-memory reference tensor for tensor, reads bf16 as bf16, and fails clearly."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.models import load_causal_lm
from services.trainer import pruning
from services.trainer.pruning import EVENLY, IMPORTANCE, Importance, Shape

# --- the reference: the former in-memory implementation (whole fp32 teacher, hooks, one forward pass) -----------


def reference_importance(model: Any, calibration: Sequence[Sequence[int]], batch_size: int = 8) -> Importance:
    """One forward pass over `calibration` with hooks; every statistic is masked to real (non-pad) tokens."""
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = pruning.head_dim(cfg)
    acc = {
        "bi": torch.zeros(n_layers, dtype=torch.float64),
        "heads": torch.zeros(n_layers, n_heads, dtype=torch.float64),
        "neurons": torch.zeros(n_layers, cfg.intermediate_size, dtype=torch.float64),
        "channels": torch.zeros(n_layers, cfg.hidden_size, dtype=torch.float64),
        "final": torch.zeros(cfg.hidden_size, dtype=torch.float64),
    }
    state: dict[str, Any] = {}

    def seq_l2(x: Any) -> Any:
        m = state["mask"].view(*state["mask"].shape, *([1] * (x.dim() - 2)))
        return (x.float().pow(2) * m).sum(1).sqrt().sum(0).double()

    hooks = []
    for i, layer in enumerate(model.model.layers):

        def layer_hook(mod: Any, args: Any, kwargs: Any, out: Any, i: int = i) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            acc["bi"][i] += ((1 - cos) * state["mask"]).sum().double()

        def o_proj_hook(mod: Any, args: Any, i: int = i) -> None:
            x = args[0]
            acc["heads"][i] += seq_l2(x.view(*x.shape[:2], n_heads, head_dim).float().norm(dim=-1))

        def down_hook(mod: Any, args: Any, i: int = i) -> None:
            acc["neurons"][i] += seq_l2(args[0])

        def norm_hook(mod: Any, args: Any, out: Any, i: int = i) -> None:
            acc["channels"][i] += seq_l2(out)

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
                width = max(len(s) for s in chunk)
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
                state["mask"] = mask.float()
                tokens += int(mask.sum())
                model.model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return Importance(
        layers=acc["bi"] / tokens,
        heads=acc["heads"],
        neurons=acc["neurons"],
        channels=acc["channels"],
        final_channels=acc["final"],
    )


def reference_prune(model: Any, shape: Shape, selection: str, calibration: Sequence[Sequence[int]]) -> Any:
    """A smaller model of `shape` initialised from `model`'s weights (the former in-memory Minitron pruning)."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    imp = reference_importance(model, calibration) if pruning.needs_statistics(cfg, shape, selection) else None
    kept = pruning.select_layers(cfg.num_hidden_layers, shape.num_layers, selection, imp.layers if imp else None)
    head_dim = pruning.head_dim(cfg)
    group_t = cfg.num_attention_heads // cfg.num_key_value_heads
    group_s = shape.num_attention_heads // shape.num_key_value_heads

    def top(scores: Any, k: int) -> Any:
        return torch.sort(torch.topk(scores, k).indices).values

    if imp is not None and shape.hidden_size < cfg.hidden_size:
        channels = top(imp.channels[kept].sum(0) + imp.final_channels, shape.hidden_size)
    else:
        channels = torch.arange(cfg.hidden_size)
    student = AutoModelForCausalLM.from_config(pruning.student_config(cfg, shape, kept), dtype=torch.float32)
    src, dst = model.model, student.model
    with torch.no_grad():
        dst.embed_tokens.weight.copy_(src.embed_tokens.weight[:, channels])
        if not cfg.tie_word_embeddings:
            student.lm_head.weight.copy_(model.lm_head.weight[:, channels])
        for j, i in enumerate(kept):
            s, d = src.layers[i], dst.layers[j]
            if imp is not None and shape.num_attention_heads < cfg.num_attention_heads:
                per_head = imp.heads[i].view(cfg.num_key_value_heads, group_t)
                groups = top(per_head.sum(1), shape.num_key_value_heads)
                heads = torch.cat([g * group_t + top(per_head[g], group_s) for g in groups.tolist()])
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
                neurons = top(imp.neurons[i], shape.intermediate_size)
            else:
                neurons = torch.arange(cfg.intermediate_size)
            d.mlp.gate_proj.weight.copy_(s.mlp.gate_proj.weight[neurons][:, channels])
            d.mlp.up_proj.weight.copy_(s.mlp.up_proj.weight[neurons][:, channels])
            d.mlp.down_proj.weight.copy_(s.mlp.down_proj.weight[channels][:, neurons])
            d.input_layernorm.weight.copy_(s.input_layernorm.weight[channels])
            d.post_attention_layernorm.weight.copy_(s.post_attention_layernorm.weight[channels])
        dst.norm.weight.copy_(src.norm.weight[channels])
    return student


# --- tiny teachers (no tokenizer needed: calibration is token ids) -----------------------------------------------


def make_teacher(
    folder: Path,
    *,
    model_type: str = "llama",
    tied: bool = True,
    dtype: str = "float32",
    attention_bias: bool = False,
    sharded: bool = False,
) -> Path:
    """A random 4-layer model (hidden 64, 4 query / 2 key-value heads of 16, MLP 128, vocab 256) as safetensors."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    kw: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    if model_type == "llama":
        config: Any = LlamaConfig(head_dim=16, attention_bias=attention_bias, **kw)
    else:
        config = Qwen2Config(**kw)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # spread the weights so the statistics separate clearly
            p.add_(torch.randn_like(p) * 0.1)
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(folder, max_shard_size="60KB" if sharded else "5GB")
    return folder


def calibration(n: int = 20, vocab: int = 256, seed: int = 0) -> list[list[int]]:
    """`n` token-id sequences of 3–40 tokens (uneven lengths, so batches carry padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 41, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


CASES: dict[str, tuple[dict[str, Any], Shape, str]] = {
    "depth-evenly-tied": ({}, Shape(2, 64, 128, 4, 2), EVENLY),
    "depth-importance-untied": ({"tied": False}, Shape(2, 64, 128, 4, 2), IMPORTANCE),
    "width-depth-tied": ({}, Shape(2, 32, 64, 2, 1), IMPORTANCE),
    "width-depth-untied-sharded-bias": (
        {"tied": False, "sharded": True, "attention_bias": True},
        Shape(3, 48, 96, 2, 1),
        IMPORTANCE,
    ),
    "width-evenly-bf16": ({"dtype": "bfloat16"}, Shape(3, 32, 64, 4, 2), EVENLY),
    "qwen2-width-depth": ({"model_type": "qwen2"}, Shape(2, 32, 64, 2, 1), IMPORTANCE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lean_pruning_equals_the_in_memory_reference(case: str, tmp_path: Path) -> None:
    kw, shape, selection = CASES[case]
    teacher = make_teacher(tmp_path / "teacher", **kw)
    if kw.get("sharded"):
        assert (teacher / "model.safetensors.index.json").is_file()
    calib = calibration()
    model = load_causal_lm(teacher, dtype=torch.float32)

    if pruning.needs_statistics(model.config, shape, selection):
        lean, ref = pruning.measure_importance(teacher, calib), reference_importance(model, calib)
        for field in ("layers", "heads", "neurons", "channels", "final_channels"):
            torch.testing.assert_close(getattr(lean, field), getattr(ref, field), rtol=1e-4, atol=1e-6)

    dtype = kw.get("dtype", "float32")
    result = pruning.prune(teacher, shape, selection, calib, tmp_path / "student", dtype=dtype)
    reference = reference_prune(model, shape, selection, calib).state_dict()
    expected = {name: t.to(getattr(torch, dtype)) for name, t in reference.items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    got = load_file(tmp_path / "student" / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert result.parameters == sum(t.numel() for t in expected.values())
    assert len(result.layers) == shape.num_layers
    # The folder loads as a transformers model of the student's shape.
    student = load_causal_lm(tmp_path / "student")
    assert student.config.num_hidden_layers == shape.num_layers and student.config.hidden_size == shape.hidden_size
    assert json.loads((tmp_path / "student" / "config.json").read_text())["dtype"] == dtype


@contextmanager
def _spy(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Records every tensor read from the teacher's files, and how many teacher modules are in memory at once."""
    reads: list[tuple[str, torch.dtype]] = []
    live = {"now": 0, "max": 0}
    get, materialised = pruning.TeacherWeights.get, pruning.materialised

    def spy_get(self: Any, name: str) -> torch.Tensor:
        t = get(self, name)
        reads.append((name, t.dtype))
        return t

    @contextmanager
    def spy_materialised(*args: Any) -> Any:
        with materialised(*args) as module:
            live["now"] += 1
            live["max"] = max(live["max"], live["now"])
            yield module
            live["now"] -= 1

    def no_whole_model(*args: Any, **kw: Any) -> None:
        raise AssertionError("pruning loaded the whole teacher")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(pruning.TeacherWeights, "get", spy_get)
    monkeypatch.setattr(pruning, "materialised", spy_materialised)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_whole_model)
    yield reads, live


def test_a_bf16_teacher_is_read_in_bf16_one_layer_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = make_teacher(tmp_path / "teacher", dtype="bfloat16", tied=False)
    with _spy(monkeypatch) as (reads, live):
        pruning.prune(teacher, Shape(2, 32, 64, 2, 1), IMPORTANCE, calibration(), tmp_path / "s")
    assert reads and {dtype for _, dtype in reads} == {torch.bfloat16}
    assert live["max"] == 1  # one decoder layer (or the final norm) in float32 at a time, never the whole model
    # Each tensor is read at most twice (statistics pass, then the student), never once per calibration batch.
    names = [name for name, _ in reads]
    assert max(names.count(n) for n in set(names)) <= 2


def test_depth_only_pruning_reads_only_the_kept_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = make_teacher(tmp_path / "teacher", dtype="bfloat16")
    with _spy(monkeypatch) as (reads, live):
        result = pruning.prune(teacher, Shape(2, 64, 128, 4, 2), EVENLY, None, tmp_path / "s")
    assert result.layers == [0, 3] and live["max"] == 0
    read_layers = {int(name.split(".")[2]) for name, _ in reads if name.startswith("model.layers.")}
    assert read_layers == {0, 3}


def test_unsupported_model_type_says_what_works_instead(tmp_path: Path) -> None:
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(folder)
    save_file({"wte.weight": torch.zeros(4, 32)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*llama, mistral, qwen2.*--student"):
        pruning.prune(folder, Shape(1, 32, 64, 2, 2), EVENLY, None, tmp_path / "s")


def test_missing_or_empty_calibration_is_a_clear_error(tmp_path: Path) -> None:
    teacher = make_teacher(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"^calibration: .*required"):
        pruning.prune(teacher, Shape(4, 32, 128, 4, 2), EVENLY, None, tmp_path / "s1")
    with pytest.raises(ValueError, match=r"^calibration: .*required"):
        pruning.prune(teacher, Shape(2, 64, 128, 4, 2), IMPORTANCE, [], tmp_path / "s2")
    with pytest.raises(ValueError, match=r"^calibration: no tokens"):
        pruning.prune(teacher, Shape(2, 64, 128, 4, 2), IMPORTANCE, [[]], tmp_path / "s3")
    with pytest.raises(ValueError, match=r"^calibration: token id 999"):
        pruning.prune(teacher, Shape(2, 64, 128, 4, 2), IMPORTANCE, [[1, 999]], tmp_path / "s4")


def test_layer_selection() -> None:
    assert pruning.select_layers(30, 6, EVENLY) == [0, 6, 12, 17, 23, 29]
    assert pruning.select_layers(4, 4, EVENLY) == [0, 1, 2, 3]
    assert pruning.select_layers(4, 1, EVENLY) == [3]
    bi = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.8])
    assert pruning.select_layers(5, 3, IMPORTANCE, bi) == [0, 2, 4]
