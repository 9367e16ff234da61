"""How much memory a run needs (estimated from its spec) and how much the machine or container has."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: fp32 weights, their gradients and Adam's two moments: 16 bytes per trained parameter.
TRAIN_BYTES_PER_PARAMETER = 16


def parameters(
    config: dict[str, Any], layers: int, hidden: int, inter: int, heads: int, kv_heads: int, head_rows: int = 0
) -> int:
    """Parameters of a Llama-family decoder of this shape (embeddings, attention, gated MLP, norms). `head_rows`:
    the rows of a restricted output vocabulary's LM head (its own weights, never tied); 0 for the full head."""
    vocab = int(config.get("vocab_size", 32000))
    head_dim = int(config.get("head_dim") or config.get("hidden_size", hidden) // max(config.get(
        "num_attention_heads", heads), 1))  # fmt: skip
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    if head_rows:
        embeddings = (vocab + head_rows) * hidden
    else:
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return embeddings + layers * (attention + 3 * hidden * inter + 2 * hidden) + hidden


def run_bytes(student_parameters: int, teacher_parameters: int, logit_width: int, batch: int, seq_len: int) -> int:
    """Peak bytes of a training step: the student's optimizer state, the teacher's weights (loaded for pruning and
    calibration, fp32), and the logits of a batch with their log-softmax and gradient (3 fp32 copies).
    `logit_width`: the vocabulary, or a restricted output vocabulary's head rows (the losses see only those)."""
    logits = 3 * 4 * batch * seq_len * logit_width
    return TRAIN_BYTES_PER_PARAMETER * student_parameters + 4 * teacher_parameters + logits


def machine_bytes() -> int:
    """Physical memory, or the cgroup (container) limit when that is lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total
