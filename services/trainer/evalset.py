"""The held-out set: eval-split teacher samples and prompts, never trained on, persisted with each checkpoint.

The first `max_agreement_samples` eval samples are kept for agreement (KL, top-1 match) and perplexity, and the
first `max_prompts` eval prompts that carry a reference answer for task accuracy (the student answers them). The
teacher's accuracy is counted over every eval sample of those prompts, checked by the same task checker. Keeping
the first ones (not a moving window) makes successive evaluations of a run comparable.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from services.common import pb
from services.tasks import get_task, task_names


@dataclass
class EvalPrompt:
    prompt_id: str
    task: str
    prompt_token_ids: list[int]
    reference: str
    teacher_correct: int = 0
    teacher_total: int = 0


class EvalSet:
    def __init__(self, max_prompts: int, max_samples: int, default_task: str) -> None:
        self.max_prompts = max_prompts
        self.max_samples = max_samples
        self.default_task = default_task
        self.prompts: dict[str, EvalPrompt] = {}
        self.samples: list[pb.common.TeacherSample] = []

    def add(self, sample: pb.common.TeacherSample) -> None:
        if len(self.samples) < self.max_samples and sample.completion_token_ids:
            self.samples.append(sample)
        task = sample.task or self.default_task
        if not sample.HasField("reference_answer") or task not in task_names():
            return
        prompt = self.prompts.get(sample.prompt_id)
        if prompt is None:
            if len(self.prompts) >= self.max_prompts:
                return
            prompt = EvalPrompt(sample.prompt_id, task, list(sample.prompt_token_ids), sample.reference_answer)
            self.prompts[sample.prompt_id] = prompt
        prompt.teacher_total += 1
        prompt.teacher_correct += int(get_task(task).check(sample.completion_text, sample.reference_answer))

    def ready(self, min_samples: int) -> bool:
        return len(self.samples) + len(self.prompts) > 0 and max(len(self.samples), len(self.prompts)) >= min_samples

    def teacher_accuracy(self) -> float | None:
        total = sum(p.teacher_total for p in self.prompts.values())
        if total == 0:
            return None
        return sum(p.teacher_correct for p in self.prompts.values()) / total

    def to_state(self) -> dict[str, Any]:
        return {
            "prompts": [p.__dict__ for p in self.prompts.values()],
            "samples": [base64.b64encode(s.SerializeToString()).decode() for s in self.samples],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.prompts = {p["prompt_id"]: EvalPrompt(**p) for p in state.get("prompts", [])}
        self.samples = []
        for raw in state.get("samples", []):
            sample = pb.common.TeacherSample()
            sample.ParseFromString(base64.b64decode(raw))
            self.samples.append(sample)
