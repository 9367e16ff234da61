"""The student's completions of a batch of prompts (transformers `generate`): greedy for evaluation, sampled for
on-policy rounds. Prompts are left-padded so every one ends where its new tokens begin."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def complete(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    autocast: bool,
    device: torch.device | None = None,
    temperature: float = 0.0,
    batch_size: int = 32,
) -> list[list[int]]:
    """Token ids of each prompt's completion, up to and including its first end-of-sequence token (greedy at
    temperature 0, else sampled from the full distribution: no top-k or top-p)."""
    device = device or torch.device("cpu")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        # Sampling from the student's own distribution, untruncated (the model's generation config may set top-k).
        sampled = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        sampling = sampled if temperature > 0 else {"do_sample": False}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                **sampling,
            )
        for row in generated[:, width:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out
