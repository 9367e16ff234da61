"""The TRL side of `distillery bench onpolicy`: TRL 1.16's `DistillationTrainer` for a fixed wall time.

`DistillationTrainer` (GKD, Agarwal et al. 2024, arXiv:2306.13649) is on-policy at every step: it samples a batch of
completions from the student (transformers `generate` in its own process), runs the teacher (a transformers model
in the same process) over them and trains the student on the generalized JSD between the two over the full
vocabulary. It has no off-policy share (no λ): every trained token is the student's own.

Its settings, and why:
- `beta=1.0`: reverse KL, its default, the loss of GKD's on-policy runs and the loss our on-policy share trains with;
- `temperature=1.0`, `top_p=1.0`, `top_k=0`: its defaults, plain sampling at temperature 1 as ours samples;
- `max_completion_length`: our on-policy rounds' `max_new_tokens` (its default of 512 is for open-ended chat; the
  task's answers end within a few dozen tokens, and ours are capped there too);
- `use_vllm=False`: its colocated vLLM mode fails on this CPU build (vLLM 0.32; TRL 1.16 supports up to 0.31): the
  engine starts, then the first weight sync raises `AttributeError: 'Parameter' object has no attribute
  'weight_loader'`; transformers `generate` is its default and the mode its docs document first;
- `gradient_checkpointing=False` (its config turns it on, trading ≈20% speed for memory a 17M student does not
  need; ours recomputes nothing), `bf16` where the CPU has it natively (as ours autocasts), the teacher in bf16 there;
- the optimizer as ours: AdamW at our learning rate (1e-3: the trainer's for a freshly pruned student; TRL's default
  1e-6 is for fine-tuning pretrained models and would not move a pruned one in minutes), betas (0.9, 0.95), weight
  decay 0.01, gradient clipping at 1.0, 20 warm-up steps then constant (ours is cosine over `max_steps`, which the
  bench sets so large that it stays flat), the same batch size.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.bench.trl_args import cpu_peer_args
from services.common.cpu import native_bf16

Log = Callable[[str], None]
#: Steps TRL is configured for: it is stopped by the wall clock long before (the schedule is constant anyway).
MAX_STEPS = 1_000_000
#: The settings that do not come from our run's spec (the module docstring says why each), as configured and as the
#: bench reports them; with `cpu_peer_args` (gradient checkpointing off, bf16 where native).
FIXED: dict[str, Any] = {"beta": 1.0, "top_p": 1.0, "top_k": 0, "use_vllm": False}


@dataclass
class TrlRun:
    """What TRL did within its wall time."""

    steps: int
    completion_tokens: int
    seconds: float
    model: Any

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class DeadlineClock:
    """Stops training at the first step that ends `wall_s` or more after training began (the step in flight is
    finished, as ours finishes its step after StopRun). Used as a transformers `TrainerCallback` through `callback()`;
    the clock is injectable so the logic is testable without a trainer."""

    def __init__(self, wall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if wall_s <= 0:
            raise ValueError(f"wall_s={wall_s}: must be > 0")
        self.wall_s = wall_s
        self.clock = clock
        self.started: float | None = None
        self.ended: float | None = None
        self.steps = 0

    def begin(self) -> None:
        self.started = self.clock()

    def step_ended(self) -> bool:
        """Counts a finished step; True when training must stop."""
        if self.started is None:
            raise RuntimeError("step_ended before begin")
        self.steps += 1
        now = self.clock()
        if now - self.started >= self.wall_s:
            self.ended = now
            return True
        return False

    @property
    def seconds(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended if self.ended is not None else self.clock()) - self.started

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class StopAtDeadline(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.begin()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if clock.step_ended():
                    control.should_training_stop = True

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if clock.ended is None:
                    clock.ended = clock.clock()

        return StopAtDeadline()


def prompt_rows(chats: list[Any]) -> list[dict[str, Any]]:
    """TRL's prompt-only rows: a conversational prompt (messages) or a raw text prompt, as the teacher got them."""
    return [{"prompt": chat} for chat in chats]


@dataclass
class TrlSettings:
    wall_s: float
    batch_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    max_completion_length: int
    temperature: float
    seed: int


def train_trl(
    settings: TrlSettings, student_dir: Path, teacher_dir: Path, prompts: list[Any], threads: int, log: Log
) -> TrlRun:
    """Trains the student in `student_dir` with TRL's `DistillationTrainer` on `prompts` (chats or texts) until
    `settings.wall_s` of training wall time has passed. Counted: the completion tokens its loss scores (the mask
    over the student's sampled completions, up to and including their end-of-sequence token)."""
    import torch
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from services.common.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(threads)
    counted = {"tokens": 0}

    class Counting(DistillationTrainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if model.training:
                counted["tokens"] += int(inputs["completion_mask"].sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    clock = DeadlineClock(settings.wall_s)
    bf16 = native_bf16()
    tokenizer = load_tokenizer(student_dir)
    tokenizer.padding_side = "left"  # TRL generates from left-padded prompts
    with tempfile.TemporaryDirectory(prefix="distillery-trl-distil-") as out:
        args = DistillationConfig(
            output_dir=out,
            per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=1,
            max_steps=MAX_STEPS,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=settings.warmup_steps,
            adam_beta2=0.95,
            weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm,
            temperature=settings.temperature,
            max_completion_length=settings.max_completion_length,
            **FIXED,
            **cpu_peer_args(settings.seed, logging_steps=MAX_STEPS),
        )
        trainer = Counting(
            model=load_causal_lm(student_dir, dtype=torch.float32),
            teacher_model=load_causal_lm(teacher_dir, dtype=torch.bfloat16 if bf16 else torch.float32),
            args=args,
            train_dataset=Dataset.from_list(prompt_rows(prompts)),
            processing_class=tokenizer,
            callbacks=[clock.callback()],
        )
        log(f"TRL DistillationTrainer: {settings.wall_s:.0f} s of training, batch {settings.batch_size}, bf16 {bf16}")
        trainer.train()
        # Without the mixed-precision wrapper: our evaluator sets bf16 autocast itself, as it does for ours.
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return TrlRun(steps=clock.steps, completion_tokens=counted["tokens"], seconds=clock.seconds, model=model)
