"""Evaluation on the held-out set: task accuracy (the student answers), agreement with the teacher, perplexity.

- accuracy: greedy generation with transformers from each held-out prompt's `prompt_token_ids`, checked by the
  task's checker against the reference answer;
- teacher_accuracy: the teacher's own held-out samples of the same prompts, checked the same way;
- kl: mean KL(teacher top-k + tail ‖ student) per completion token of the held-out teacher samples;
- top1_agreement: fraction of those positions where the student's argmax is the teacher's top-1;
- perplexity: exp of the student's mean cross-entropy on the teacher's held-out completions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.common import pb
from services.tasks import get_task
from services.trainer.batching import answer_logits, collate
from services.trainer.buffer import SAMPLE, Item
from services.trainer.evalset import EvalSet
from services.trainer.losses import forward_kl, student_buckets, teacher_buckets, token_cross_entropy


@dataclass
class EvalResult:
    accuracy: float | None = None
    teacher_accuracy: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    perplexity: float | None = None
    prompts: int = 0
    samples: list[dict[str, str]] = field(default_factory=list)  # a few student answers, for logs

    def metrics(self) -> dict[str, float]:
        names = ("accuracy", "teacher_accuracy", "kl", "top1_agreement", "perplexity")
        return {n: float(getattr(self, n)) for n in names if getattr(self, n) is not None}

    def to_proto(self, step: int) -> pb.trainer.EvalMetrics:
        out = pb.trainer.EvalMetrics(step=step, eval_prompts=self.prompts)
        for name, value in self.metrics().items():
            setattr(out, name, value)
        return out


def _sample_item(sample: pb.common.TeacherSample, max_len: int) -> Item | None:
    prompt = list(sample.prompt_token_ids)
    c = min(len(sample.completion_token_ids), max_len - len(prompt))
    if c <= 0 or sample.top_k == 0:
        return None
    k = sample.top_k
    return Item(
        partition=-1,
        offset=-1,
        kind=SAMPLE,
        input_ids=prompt + list(sample.completion_token_ids[:c]),
        prompt_len=len(prompt),
        top_ids=np.asarray(sample.top_ids, dtype=np.int64).reshape(-1, k)[:c],
        top_logprobs=np.asarray(sample.top_logprobs, dtype=np.float32).reshape(-1, k)[:c],
    )


@torch.no_grad()
def agreement(
    model: Any, samples: list[pb.common.TeacherSample], max_len: int, pad_id: int, autocast: bool, batch_size: int = 16
) -> tuple[float | None, float | None, float | None]:
    """(KL per token, top-1 agreement, perplexity) of the student on held-out teacher samples."""
    items = [it for it in (_sample_item(s, max_len) for s in samples) if it is not None]
    kl_sum = top1 = ce_sum = 0.0
    n = 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad_id)
        logits = answer_logits(model, batch.input_ids, batch.positions, autocast).float()  # (N, V)
        t_log = teacher_buckets(batch.top_logprobs)
        s_log = student_buckets(logits, batch.top_ids, batch.top_valid)
        kl_sum += float(forward_kl(t_log, s_log).sum())
        top1 += float((logits.argmax(-1) == batch.top_ids[:, 0]).sum())
        ce_sum += float(token_cross_entropy(logits, batch.targets).sum())
        n += batch.targets_count
    if n == 0:
        return None, None, None
    return kl_sum / n, top1 / n, math.exp(min(ce_sum / n, 50.0))


@torch.no_grad()
def task_accuracy(
    model: Any, tokenizer: Any, evalset: EvalSet, max_new_tokens: int, autocast: bool, batch_size: int = 32
) -> tuple[float | None, list[dict[str, str]]]:
    """Greedy answers to the held-out prompts, checked against their references."""
    prompts = list(evalset.prompts.values())
    if not prompts:
        return None, []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct = 0
    shown: list[dict[str, str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p.prompt_token_ids) for p in chunk)
        # Left padding for generation, so every prompt ends where the new tokens begin.
        ids = torch.tensor([[pad] * (width - len(p.prompt_token_ids)) + p.prompt_token_ids for p in chunk])
        mask = torch.tensor([[0] * (width - len(p.prompt_token_ids)) + [1] * len(p.prompt_token_ids) for p in chunk])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        for p, row in zip(chunk, out[:, width:].tolist(), strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            ok = get_task(p.task).check(text, p.reference)
            correct += int(ok)
            if len(shown) < 3:
                shown.append({"prompt_id": p.prompt_id, "answer": text[:200], "correct": str(ok)})
    return correct / len(prompts), shown


def evaluate(model: Any, tokenizer: Any, evalset: EvalSet, spec: pb.trainer.RunSpec) -> EvalResult:
    was_training = model.training
    model.eval()
    try:
        autocast = spec.schedule.bf16_autocast
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kl, top1, ppl = agreement(model, evalset.samples, spec.schedule.max_seq_len, pad, autocast)
        accuracy, shown = task_accuracy(model, tokenizer, evalset, spec.eval.max_new_tokens, autocast)
        return EvalResult(
            accuracy=accuracy,
            teacher_accuracy=evalset.teacher_accuracy(),
            kl=kl,
            top1_agreement=top1,
            perplexity=ppl,
            prompts=len(evalset.prompts),
            samples=shown,
        )
    finally:
        model.train(was_training)
