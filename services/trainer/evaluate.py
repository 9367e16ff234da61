"""Evaluation on the held-out set: the student's greedy answers, judged by the checker and against the teacher's.

- accuracy: the student's greedy answers (transformers, from each held-out prompt's token ids) checked by the run's
  checker against the reference answers; needs a checker and references;
- teacher_accuracy / teacher_accuracy_best_prompt / by variant: the teacher's own held-out answers, checked the same
  way, in the student's phrasing and in its best one;
- teacher_agreement: fraction of held-out prompts where the student's greedy answer equals the teacher's
  (whitespace normalised) — fidelity to the teacher, the score of a run without a checker;
- kl: mean KL(teacher top-k + tail ‖ student) per completion token of the held-out teacher samples;
- top1_agreement: fraction of those positions where the student's argmax is the teacher's top-1;
- perplexity: exp of the student's mean cross-entropy on the teacher's held-out completions.

A student with a restricted output vocabulary is measured on its head as it is trained (`batching.onto_head`):
teacher top-k mass outside the head is in the tail bucket (not an infinite KL), a teacher top-1 outside the head is
a disagreement, and perplexity is over the completion tokens the head has a row for (the trainer reports the share
of those, `output_vocab_heldout_coverage`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.common import pb
from services.trainer.batching import answer_logits, collate, onto_head, restricted_head
from services.trainer.buffer import SAMPLE, Item
from services.trainer.evalset import EvalPrompt, EvalSet
from services.trainer.generation import complete
from services.trainer.losses import forward_kl, student_buckets, teacher_buckets, token_cross_entropy


@dataclass
class EvalResult:
    accuracy: float | None = None
    teacher_accuracy: float | None = None
    teacher_accuracy_best_prompt: float | None = None
    teacher_agreement: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    perplexity: float | None = None
    teacher_accuracy_by_variant: dict[str, float] = field(default_factory=dict)
    prompts: int = 0
    samples: list[dict[str, str]] = field(default_factory=list)  # a few student answers, for logs

    def metrics(self) -> dict[str, float]:
        names = ("accuracy", "teacher_accuracy", "teacher_accuracy_best_prompt", "teacher_agreement", "kl",
                 "top1_agreement", "perplexity")  # fmt: skip
        out = {n: float(getattr(self, n)) for n in names if getattr(self, n) is not None}
        for variant, value in self.teacher_accuracy_by_variant.items():
            out[f"teacher_accuracy.{variant or 'primary'}"] = value
        return out

    def to_proto(self, step: int, gate_metric: str = "") -> pb.trainer.EvalMetrics:
        out = pb.trainer.EvalMetrics(step=step, eval_prompts=self.prompts, gate_metric=gate_metric)
        for name in ("accuracy", "teacher_accuracy", "teacher_accuracy_best_prompt", "teacher_agreement", "kl",
                     "top1_agreement", "perplexity"):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                setattr(out, name, value)
        out.teacher_accuracy_by_variant.update(self.teacher_accuracy_by_variant)
        score = self.metrics().get(gate_metric)
        if score is not None:
            out.gate_score = score
        return out


def same_answer(a: str, b: str) -> bool:
    """Whitespace-normalised equality of two answers."""
    return " ".join(a.split()) == " ".join(b.split())


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
    model: Any,
    samples: list[pb.common.TeacherSample],
    max_len: int,
    pad_id: int,
    autocast: bool,
    batch_size: int = 16,
    device: torch.device | None = None,
) -> tuple[float | None, float | None, float | None]:
    """(KL per token, top-1 agreement, perplexity) of the student on held-out teacher samples."""
    device = device or torch.device("cpu")
    items = [it for it in (_sample_item(s, max_len) for s in samples) if it is not None]
    head = restricted_head(model)
    kl_sum = top1 = ce_sum = 0.0
    n = n_ce = 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad_id).to(device)
        logits = answer_logits(model, batch.input_ids, batch.positions, autocast, compact=True).float()  # (N, V)
        top_ids, top_logprobs, top_valid, targets = batch.top_ids, batch.top_logprobs, batch.top_valid, batch.targets
        in_head = torch.ones_like(targets, dtype=torch.bool)
        if head is not None:  # (N, Nh) logits: ids in head rows
            on = onto_head(batch, head.token_ids, head.vocab_size)
            top_ids, top_logprobs, top_valid, targets, in_head = on.top_ids, on.top_logprobs, on.top_valid, \
                on.targets, on.in_head  # fmt: skip
        t_log = teacher_buckets(top_logprobs)
        s_log = student_buckets(logits, top_ids, top_valid)
        kl_sum += float(forward_kl(t_log, s_log).sum())
        top1 += float(((logits.argmax(-1) == top_ids[:, 0]) & top_valid[:, 0]).sum())
        ce_sum += float(token_cross_entropy(logits, targets)[in_head].sum())
        n += batch.targets_count
        n_ce += int(in_head.sum())
    if n == 0:
        return None, None, None
    return kl_sum / n, top1 / n, math.exp(min(ce_sum / max(n_ce, 1), 50.0))


def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    autocast: bool,
    device: torch.device | None = None,
) -> list[str]:
    """The student's greedy completion of each prompt (token ids), decoded without special tokens."""
    rows = complete(model, tokenizer, prompts, max_new_tokens, autocast, device)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def score_answers(
    prompts: list[EvalPrompt], answers: list[str], checker: Any
) -> tuple[float | None, float | None, list[dict[str, str]]]:
    """(accuracy, teacher_agreement, a few examples) of the student's answers to `prompts`."""
    judged = [(p, a) for p, a in zip(prompts, answers, strict=True) if checker is not None and p.reference is not None]
    accuracy = sum(checker(a, p.reference) for p, a in judged) / len(judged) if judged else None
    paired = [(p, a) for p, a in zip(prompts, answers, strict=True) if p.teacher_text is not None]
    agreement_rate = sum(same_answer(a, p.teacher_text or "") for p, a in paired) / len(paired) if paired else None
    shown = [
        {"prompt_id": p.prompt_id, "answer": a[:200], "teacher": (p.teacher_text or "")[:200]}
        for p, a in list(zip(prompts, answers, strict=True))[:3]
    ]
    return accuracy, agreement_rate, shown


def evaluate(
    model: Any,
    tokenizer: Any,
    evalset: EvalSet,
    spec: pb.trainer.RunSpec,
    device: torch.device | None = None,
    autocast: bool | None = None,
) -> EvalResult:
    """`autocast`: bf16 autocast (default: the spec's; the trainer turns it off where bf16 is emulated)."""
    was_training = model.training
    model.eval()
    try:
        autocast = spec.schedule.bf16_autocast if autocast is None else autocast
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kl, top1, ppl = agreement(model, evalset.samples, spec.schedule.max_seq_len, pad, autocast, device=device)
        prompts = evalset.student_prompts()
        answers = greedy_answers(
            model, tokenizer, [p.prompt_token_ids for p in prompts], spec.eval.max_new_tokens, autocast,
            device=device,
        )  # fmt: skip
        accuracy, teacher_agreement, shown = score_answers(prompts, answers, evalset.checker)
        return EvalResult(
            accuracy=accuracy,
            teacher_accuracy=evalset.teacher_accuracy(),
            teacher_accuracy_best_prompt=evalset.teacher_accuracy_best_prompt(),
            teacher_agreement=teacher_agreement,
            kl=kl,
            top1_agreement=top1,
            perplexity=ppl,
            teacher_accuracy_by_variant=evalset.teacher_accuracy_by_variant(),
            prompts=len(prompts),
            samples=shown,
        )
    finally:
        model.train(was_training)
