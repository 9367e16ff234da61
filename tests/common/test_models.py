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
