"""The held-out set: eval-split teacher samples and prompts, never trained on, persisted with each checkpoint.

The first `max_prompts` eval prompts are kept (not a moving window, so successive evaluations of a run are
comparable). Per prompt: the token ids of its primary phrasing (prompt_variant "", what the student is trained
and served with), its reference answer when it has one, the teacher's greedy answer (what teacher_agreement
compares the student's with) and the teacher's correct/total counts per phrasing, checked by the run's checker:
the teacher is compared at its best phrasing. The first `max_agreement_samples` primary-phrasing samples are kept
for the token-level agreement (KL, top-1 match) and perplexity.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from services.common import pb
from services.tasks import Checker

PRIMARY = ""


@dataclass
class EvalPrompt:
    prompt_id: str
    #: The primary phrasing's token ids (empty until a sample of it arrives).
    prompt_token_ids: list[int] = field(default_factory=list)
    reference: str | None = None
    #: The teacher's answer in the primary phrasing (greedy when it was answered greedily).
    teacher_text: str | None = None
    teacher_greedy: bool = False
    #: Per phrasing: checked teacher samples, and those the checker found correct.
    teacher_correct: dict[str, int] = field(default_factory=dict)
    teacher_total: dict[str, int] = field(default_factory=dict)


def _greedy(sample: pb.common.TeacherSample) -> bool:
    return sample.sampling.HasField("temperature") and sample.sampling.temperature == 0.0


class EvalSet:
    def __init__(self, max_prompts: int, max_samples: int, checker: Checker | None) -> None:
        self.max_prompts = max_prompts
        self.max_samples = max_samples
        self.checker = checker
        self.prompts: dict[str, EvalPrompt] = {}
        self.samples: list[pb.common.TeacherSample] = []
        #: Held-out teacher samples received, every phrasing (what `ready` counts).
        self.received = 0

    def add(self, sample: pb.common.TeacherSample) -> None:
        self.received += 1
        variant = sample.prompt_variant
        if variant == PRIMARY and len(self.samples) < self.max_samples and sample.completion_token_ids:
            self.samples.append(sample)
        prompt = self.prompts.get(sample.prompt_id)
        if prompt is None:
            if len(self.prompts) >= self.max_prompts:
                return
            prompt = self.prompts[sample.prompt_id] = EvalPrompt(sample.prompt_id)
        if sample.HasField("reference_answer") and prompt.reference is None:
            prompt.reference = sample.reference_answer
        if variant == PRIMARY:
            if not prompt.prompt_token_ids:
                prompt.prompt_token_ids = list(sample.prompt_token_ids)
            # Agreement compares greedy answers: a greedy sample replaces a sampled one, never the reverse.
            if prompt.teacher_text is None or (_greedy(sample) and not prompt.teacher_greedy):
                prompt.teacher_text = sample.completion_text
                prompt.teacher_greedy = _greedy(sample)
        if self.checker is not None and sample.HasField("reference_answer"):
            correct = self.checker(sample.completion_text, sample.reference_answer)
            prompt.teacher_total[variant] = prompt.teacher_total.get(variant, 0) + 1
            prompt.teacher_correct[variant] = prompt.teacher_correct.get(variant, 0) + int(correct)

    def student_prompts(self) -> list[EvalPrompt]:
        """The prompts the student answers: those whose primary phrasing has arrived."""
        return [p for p in self.prompts.values() if p.prompt_token_ids]

    def ready(self, min_samples: int) -> bool:
        """Whether the held-out set can be evaluated: some prompt to answer, and `min_samples` held-out samples
        (every phrasing) received."""
        return bool(self.student_prompts()) and self.received >= min_samples

    def teacher_accuracy_by_variant(self) -> dict[str, float]:
        """The teacher's accuracy in each phrasing, over every checked sample of the kept prompts."""
        out: dict[str, float] = {}
        variants = {v for p in self.prompts.values() for v in p.teacher_total}
        for variant in sorted(variants):
            total = sum(p.teacher_total.get(variant, 0) for p in self.prompts.values())
            if total:
                out[variant] = sum(p.teacher_correct.get(variant, 0) for p in self.prompts.values()) / total
        return out

    def teacher_accuracy(self) -> float | None:
        """In the primary phrasing (the student's)."""
        return self.teacher_accuracy_by_variant().get(PRIMARY)

    def teacher_accuracy_best_prompt(self) -> float | None:
        by_variant = self.teacher_accuracy_by_variant()
        return max(by_variant.values()) if by_variant else None

    def to_state(self) -> dict[str, Any]:
        return {
            "prompts": [p.__dict__ for p in self.prompts.values()],
            "samples": [base64.b64encode(s.SerializeToString()).decode() for s in self.samples],
            "received": self.received,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        known = set(EvalPrompt.__dataclass_fields__)
        self.prompts = {}
        for raw in state.get("prompts", []):
            entry = {k: v for k, v in raw.items() if k in known}
            for name in ("teacher_correct", "teacher_total"):  # checkpoints before phrasings were counted apart
                if isinstance(entry.get(name), int):
                    entry[name] = {PRIMARY: entry[name]}
            self.prompts[entry["prompt_id"]] = EvalPrompt(**entry)
        self.samples = []
        self.received = int(state.get("received", len(state.get("samples", []))))
        for raw in state.get("samples", []):
            sample = pb.common.TeacherSample()
            sample.ParseFromString(base64.b64decode(raw))
            self.samples.append(sample)
