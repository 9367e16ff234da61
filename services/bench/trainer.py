"""`distillery bench trainer`: does the trainer keep up with the teacher, and how does it compare with TRL's GKD?

One run, one machine, each phase with the machine to itself:
1. teacher: offline `vllm.LLM` on the default teacher answers seed-task prompts (chat template, temperature 1,
   top-20 log-probs, natural EOS); `teacher_tokens_per_s` = generated tokens / generation wall time.
2. trainer: the default student recipe trains on those samples with this trainer's step (answer-only LM head,
   bf16 autocast, top-20 + tail forward KL, AdamW, clipping); `trainer_tokens_per_s` = completion tokens trained /
   wall time of whole optimizer steps (after warm-up steps).
3. TRL 1.16 `GKDTrainer` (off-policy `lmbda=0`, `beta=0` = forward KL, `use_cpu=True`, bf16, the teacher model in
   memory and run every step) trains the same student on the same samples (chat messages with the teacher's
   completion text), same batch size; `trl_gkd_tokens_per_s` counts its completion (label) tokens the same way.
4. TRL 1.16 `SFTTrainer` (the design-neutral peer): the same student on the same teacher completions, completion-only
   cross-entropy, no teacher in memory. Both TRL trainers run with gradient checkpointing off (their configs turn it
   on by default, trading ≈20% speed for memory a 17M student does not need) and bf16 where ours uses it.
`keeps_up` = trainer ≥ teacher; `vs_trl_gkd` = trainer / TRL GKD (includes GKD's teacher forward per step, a design
difference); `vs_trl_sft` = trainer / TRL SFT (no teacher forward on either side: the engineering). Engine start and
model loading are off the clocks.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.bench.trl_args import cpu_peer_args
from services.common.cpu import native_bf16
from services.common.vllm_engine import VllmSettings

Log = Callable[[str], None]


@dataclass
class BenchConfig:
    prompts: int = 128
    max_tokens: int = 64
    top_k: int = 20
    steps: int = 20
    warmup_steps: int = 2
    batch_size: int = 16
    trl: bool = True
    temperature: float = 1.0
    enforce_eager: bool = False
    kv_cache_gib: float = 1.0
    seed: int = 0
    threads: int = 0
    compile: bool = False


@dataclass
class Sample:
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_text: str
    top_ids: np.ndarray  # (C, K)
    top_logprobs: np.ndarray  # (C, K)


def _prompts(tokenizer: Any, n: int, seed: int) -> list[tuple[list[dict[str, str]], list[int]]]:
    from services.bench.output_vocab import prompt_ids
    from services.tasks.builtin import default_prompts

    chats = [example.content.chat() for example in default_prompts(n, seed)]
    return [(messages, prompt_ids(tokenizer, messages)) for messages in chats]


def teacher_samples(config: BenchConfig, teacher_dir: Path, log: Log) -> tuple[list[Sample], dict[str, Any]]:
    """Generates the samples with offline vLLM; returns them and the teacher's timing."""
    from services.common.models import load_tokenizer
    from services.common.vllm_engine import offline_llm

    settings = VllmSettings(
        kv_cache_gib=config.kv_cache_gib, max_num_seqs=128, enforce_eager=config.enforce_eager, seed=config.seed
    )
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = _prompts(load_tokenizer(teacher_dir), config.prompts, config.seed)
    log(f"teacher: starting vLLM on {teacher_dir.name}")
    with offline_llm(teacher_dir, settings) as llm:
        params = SamplingParams(temperature=config.temperature, max_tokens=config.max_tokens, logprobs=config.top_k)
        llm.generate([TokensPrompt(prompt_token_ids=prompts[0][1])], params, use_tqdm=False)  # warm-up
        log(f"teacher: generating {len(prompts)} completions, top-{config.top_k} logprobs")
        started = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for _, ids in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
    samples = []
    for (messages, ids), out in zip(prompts, outputs, strict=True):
        comp = out.outputs[0]
        k = config.top_k
        top_ids = np.zeros((len(comp.token_ids), k), dtype=np.int64)
        top_lp = np.full((len(comp.token_ids), k), -np.inf, dtype=np.float32)
        for i, entry in enumerate(comp.logprobs or []):
            # vLLM returns the top-k and the sampled token (rank may be > k): keep ranks 1..k.
            pairs = (entry or {}).items()
            ranked = sorted((lp.rank or 0, tid, lp.logprob) for tid, lp in pairs if (lp.rank or 0) <= k)[:k]
            for j, (_, tid, lp) in enumerate(ranked):
                top_ids[i, j], top_lp[i, j] = tid, lp
        samples.append(Sample(messages, ids, list(comp.token_ids), comp.text, top_ids, top_lp))
    tokens = sum(len(s.completion_ids) for s in samples)
    return samples, {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def _batches(samples: list[Sample], batch_size: int, count: int) -> list[list[Sample]]:
    """`count` batches cycling through the samples in order (both trainers see the same sequence)."""
    flat = [samples[i % len(samples)] for i in range(batch_size * count)]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def our_trainer(config: BenchConfig, student_dir: Path, samples: list[Sample], log: Log) -> dict[str, Any]:
    import torch

    from services.common.models import load_causal_lm
    from services.trainer.batching import batch_loss, collate
    from services.trainer.buffer import SAMPLE, Item
    from services.trainer.losses import LossWeights

    torch.manual_seed(config.seed)
    model = load_causal_lm(student_dir, dtype=torch.float32).train()
    body = torch.compile(model.model, dynamic=True) if config.compile else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    weights = LossWeights(forward_kl=1.0)
    pad = int(model.config.pad_token_id or 0)
    timed = targets = tokens = 0
    elapsed = 0.0
    losses = []
    log(f"trainer: {config.warmup_steps} warm-up + {config.steps} timed steps of {config.batch_size}")
    for i, group in enumerate(_batches(samples, config.batch_size, config.warmup_steps + config.steps)):
        started = time.perf_counter()
        items = [
            Item(0, 0, SAMPLE, s.prompt_ids + s.completion_ids, len(s.prompt_ids), s.top_ids, s.top_logprobs)
            for s in group
        ]
        batch = collate(items, pad)
        loss = batch_loss(model, batch, weights, autocast=native_bf16(), body=body).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if i >= config.warmup_steps:
            elapsed += time.perf_counter() - started
            timed += 1
            targets += batch.targets_count
            tokens += batch.tokens
    return {
        "steps": timed,
        "completion_tokens": targets,
        "seconds": elapsed,
        "tokens_per_s": targets / elapsed,
        "all_tokens_per_s": tokens / elapsed,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def _timed_trl(
    trainer_cls: Any,
    config_cls: Any,
    scored: Callable[[Any], Any],
    config: BenchConfig,
    rows: list[dict[str, Any]],
    student_dir: Path,
    log: Log,
    extra_args: dict[str, Any],
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """One TRL trainer on `rows` in the order `_batches` gives ours: warm-up steps, then timed steps; the completion
    tokens its loss scores (`scored(inputs)`, a mask) are counted the same way ours are. Both TRL trainers run with
    gradient checkpointing off (their configs turn it on by default, trading speed for memory a 17M student does not
    need; ours does not recompute activations either) and bf16 where ours uses it."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from services.common.models import load_causal_lm, load_tokenizer

    count = config.batch_size * (config.warmup_steps + config.steps)
    ordered = [rows[i % len(rows)] for i in range(count)]
    stats: dict[str, Any] = {"targets": 0, "seconds": 0.0, "steps": 0, "step": 0}

    class Counting(trainer_cls):  # type: ignore[misc,valid-type]
        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if stats["step"] >= config.warmup_steps:
                stats["targets"] += int(scored(inputs).sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            stats["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if stats["step"] >= config.warmup_steps:
                stats["seconds"] += time.perf_counter() - stats["t0"]
                stats["steps"] += 1
            stats["step"] += 1

    with tempfile.TemporaryDirectory(prefix="distillery-trl-") as out:
        args = config_cls(
            output_dir=out,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=1,
            max_steps=config.warmup_steps + config.steps,
            learning_rate=1e-3,
            max_length=1024,
            **cpu_peer_args(config.seed, logging_steps=10_000),
            **extra_args,
        )
        trainer = Counting(
            model=load_causal_lm(student_dir, dtype=torch.float32),
            args=args,
            train_dataset=Dataset.from_list(ordered),
            processing_class=load_tokenizer(student_dir),
            callbacks=[Clock()],
            **trainer_kwargs,
        )
        name = trainer_cls.__name__
        log(f"TRL {name}: {config.warmup_steps} warm-up + {config.steps} timed steps of {config.batch_size}")
        trainer.train()
    return {
        "steps": stats["steps"],
        "completion_tokens": stats["targets"],
        "seconds": stats["seconds"],
        "tokens_per_s": stats["targets"] / stats["seconds"],
    }


def trl_gkd(config: BenchConfig, student_dir: Path, teacher_dir: Path, samples: list[Sample], log: Log) -> dict:
    import torch
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from services.common.models import load_causal_lm

    rows = [{"messages": [*s.messages, {"role": "assistant", "content": s.completion_text}]} for s in samples]
    return _timed_trl(
        GKDTrainer,
        GKDConfig,
        # Labels are shifted inside the loss: count the positions it scores.
        lambda inputs: inputs["labels"][:, 1:] != -100,
        config,
        rows,
        student_dir,
        log,
        {"lmbda": 0.0, "beta": 0.0, "train_sampling_strategy": "sequential"},
        teacher_model=load_causal_lm(teacher_dir, dtype=torch.bfloat16),
    )


def trl_sft(config: BenchConfig, student_dir: Path, samples: list[Sample], log: Log) -> dict:
    """The design-neutral peer: TRL's `SFTTrainer` on the same precomputed teacher completions (cross-entropy on the
    teacher's sampled tokens, completion only), so neither side runs the teacher during training. Ours also reads the
    teacher's top-20 per position (a KL over 21 entries): the rest of the step is the same work."""
    from trl import SFTConfig, SFTTrainer

    def scored(inputs: Any) -> Any:
        mask = inputs.get("completion_mask")
        return mask[:, 1:] if mask is not None else inputs["labels"][:, 1:] != -100

    rows = [
        {"prompt": s.messages, "completion": [{"role": "assistant", "content": s.completion_text}]} for s in samples
    ]
    return _timed_trl(SFTTrainer, SFTConfig, scored, config, rows, student_dir, log, {})


def run_bench(config: BenchConfig, log: Log = print) -> dict[str, Any]:
    import torch

    from services.common.models import parameter_count, prepare_default_teacher
    from services.common.settings import distillery_home
    from services.trainer.recipes import DEFAULT_STUDENT_RECIPE, describe_student
    from services.trainer.student import make_student

    threads = config.threads or len(os.sched_getaffinity(0))
    teacher_dir = prepare_default_teacher(distillery_home() / "models")
    samples, teacher = teacher_samples(config, teacher_dir, log)
    torch.set_num_threads(threads)  # vLLM may have lowered it
    with tempfile.TemporaryDirectory(prefix="distillery-bench-student-") as tmp:
        student_dir = Path(tmp) / "student"
        log("student: pruning the default teacher (default recipe)")
        calibration = [s.prompt_ids + s.completion_ids for s in samples[:64]]
        student_parameters = make_student(teacher_dir, DEFAULT_STUDENT_RECIPE, student_dir, calibration)
        ours = our_trainer(config, student_dir, samples, log)
        trl = trl_gkd(config, student_dir, teacher_dir, samples, log) if config.trl else None
        sft = trl_sft(config, student_dir, samples, log) if config.trl else None
    teacher_parameters = parameter_count(teacher_dir)
    result: dict[str, Any] = {
        "teacher_tokens_per_s": round(teacher["tokens_per_s"], 1),
        "trainer_tokens_per_s": round(ours["tokens_per_s"], 1),
        "keeps_up": ours["tokens_per_s"] >= teacher["tokens_per_s"],
        "trl_gkd_tokens_per_s": round(trl["tokens_per_s"], 1) if trl else None,
        "vs_trl_gkd": round(ours["tokens_per_s"] / trl["tokens_per_s"], 2) if trl else None,
        "trl_sft_tokens_per_s": round(sft["tokens_per_s"], 1) if sft else None,
        "vs_trl_sft": round(ours["tokens_per_s"] / sft["tokens_per_s"], 2) if sft else None,
        "trainer_all_tokens_per_s": round(ours["all_tokens_per_s"], 1),
        "teacher": {"parameters": teacher_parameters, **{k: round(v, 3) for k, v in teacher.items()}},
        "student": {
            "parameters": student_parameters,
            "compression": round(teacher_parameters / student_parameters, 2),
            "recipe": describe_student(DEFAULT_STUDENT_RECIPE, head=False),
        },
        "trainer": {k: round(v, 4) if isinstance(v, float) else v for k, v in ours.items()},
        "trl_gkd": {k: round(v, 4) if isinstance(v, float) else v for k, v in trl.items()} if trl else None,
        "trl_sft": {k: round(v, 4) if isinstance(v, float) else v for k, v in sft.items()} if sft else None,
        "peers": {
            "trl_gkd": "GKDTrainer, off-policy forward KL, gradient checkpointing off; runs the bf16 teacher every "
            "step (its design): vs_trl_gkd includes that",
            "trl_sft": "SFTTrainer on the same teacher completions, completion-only cross-entropy, gradient "
            "checkpointing off: no teacher forward on either side, so vs_trl_sft is the engineering",
        },
        "samples": len(samples),
        "mean_completion_tokens": round(float(np.mean([len(s.completion_ids) for s in samples])), 1),
        "config": {**asdict(config), "threads": threads},
    }
    return result
