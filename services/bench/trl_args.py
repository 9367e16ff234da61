"""The training arguments every TRL peer in the benchmarks shares: a CPU run configured as its docs recommend for a
small student, timed, and leaving nothing behind."""

from __future__ import annotations

from typing import Any

from services.common.cpu import native_bf16


def cpu_peer_args(seed: int, logging_steps: int) -> dict[str, Any]:
    """Gradient checkpointing off (TRL's configs turn it on, trading ≈20% speed for memory a 17M student does not
    need; ours recomputes nothing), bf16 where the CPU has it natively (the precision ours trains in), no
    checkpoints, reports, progress bars or data-loader workers; `logging_steps` beyond the run keeps logging off the
    clock."""
    return {
        "gradient_checkpointing": False,
        "use_cpu": True,
        "bf16": native_bf16(),
        "logging_steps": logging_steps,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "seed": seed,
        "dataloader_num_workers": 0,
    }
