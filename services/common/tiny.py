"""Tiny Hugging Face models built in code, for tests and the smoke profile: nothing is downloaded.

`build_tokenizer` trains a small byte-level BPE on task-like text (so any string round-trips) with the same
chat tokens and template as the default teacher; `build_llama` makes a random Llama with that tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    """Text of every built-in use case (prompts and references), so the tiny tokenizer has their words."""
    from services.tasks.builtin import TASKS

    lines = []
    for task in TASKS.values():
        for e in task.generate(300, 0, 7):
            lines += [content for _, content in e.content.messages] + [e.reference or ""]
    lines += ["You are a helpful AI assistant.", "system user assistant", "The answer is 0 1 2 3 4 5 6 7 8 9."]
    return lines


def build_tokenizer(folder: Path, vocab_size: int = 1024) -> Path:
    """Writes a PreTrainedTokenizerFast (tokenizer.json + config with the chat template) into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def build_llama(
    folder: Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    vocab_size: int = 1024,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Path:
    """A random Llama with a locally built tokenizer, saved as safetensors; returns `folder`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    build_tokenizer(folder, vocab_size)
    tokenizer_vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    config = LlamaConfig(
        vocab_size=max(vocab_size, tokenizer_vocab),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(folder, safe_serialization=True)
    return folder
