"""Tiny models built in code load in transformers; unsafe folders are refused before loading."""

from pathlib import Path

import pytest
import torch

from services.common.models import ModelError, load_causal_lm, load_tokenizer, parameter_count


def test_tiny_llama_round_trips(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Sam has 3 apples."}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    model = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert parameter_count(tiny_model_dir) == sum(p.numel() for p in model.parameters())


def test_pickle_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not safetensors"):
        load_causal_lm(tmp_path)


def test_default_teacher_is_prepared_from_its_wheel_offline(tmp_path: Path) -> None:
    """`distillery models prepare` from scratch (what a fresh clone and the image build run): bf16 safetensors,
    tokenizer and chat template, a sha256 manifest, files every service user can read; later calls only verify."""
    import json
    import stat

    from transformers import AutoConfig

    from services.common.models import PREPARED_MANIFEST, prepare_default_teacher, verify_prepared

    folder = prepare_default_teacher(tmp_path)
    manifest = verify_prepared(folder)
    assert manifest["parameter_count"] == 134_515_008 and manifest["dtype"] == "bfloat16"
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(manifest["files"])
    assert parameter_count(folder) == 134_515_008
    config = AutoConfig.from_pretrained(folder)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert "<|im_start|>assistant" in load_tokenizer(folder).apply_chat_template(
        [{"role": "user", "content": "2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert prepare_default_teacher(tmp_path) == folder and weights.stat().st_mtime_ns == mtime  # verified, kept
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), "x": 1}))
    with pytest.raises(ModelError, match=r"config.json"):
        verify_prepared(folder)
    assert (folder / PREPARED_MANIFEST).is_file()
