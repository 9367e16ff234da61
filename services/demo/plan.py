"""What the teacher is asked: a job's prompts as prompt records, per split and recipe.

Held-out prompts are answered greedily (as the student is judged), once in the phrasing the student is trained
with and once in every other phrasing the prompt declares, plus without its system prompt when it has one: the
teacher is compared at its best phrasing. Training prompts follow the recipe: `kd` has the teacher answer them,
`best` also has it score the prompts' reference answers (teacher-forced samples), spread among the answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common import pb
from services.demo.job import Job
from services.tasks import Content, Example
from services.teacher.prompts import example_record

#: The phrasing without the system prompt, tried for every held-out chat that has one.
NO_SYSTEM = "no_system"


@dataclass
class Plan:
    eval_records: list[pb.common.PromptRecord]
    train_records: list[pb.common.PromptRecord]
    #: Counts for the report: prompts per split used, teacher-answered and scored training prompts, phrasings.
    eval_prompts: int
    generated_prompts: int
    scored_prompts: int
    variants: list[str]
    #: Training lines left out because the profile caps them (said in the report, never silent).
    unused_train: int


def record(
    example: Example, job: Job, sampling: pb.common.SamplingParams, *, content: Content | None = None,
    variant: str = "", score_reference: bool = False,
) -> pb.common.PromptRecord:  # fmt: skip
    return example_record(
        example, job.name, sampling, content=content, variant=variant, score_reference=score_reference
    )


def variants_of(example: Example) -> dict[str, Content]:
    """Every other phrasing of a held-out prompt: the declared ones, and without the system prompt."""
    out = dict(example.variants)
    bare = example.content.without_system()
    if bare is not None and NO_SYSTEM not in out:
        out[NO_SYSTEM] = bare
    return out


def make_plan(job: Job) -> Plan:
    p, recipe = job.profile, job.recipe
    greedy = pb.common.SamplingParams(temperature=0.0, n=1, max_tokens=p.max_tokens, logprobs=p.top_k)
    held_out = job.eval[: p.eval_prompts]
    eval_records = []
    names: set[str] = set()
    for example in held_out:
        eval_records.append(record(example, job, greedy))
        for name, content in variants_of(example).items():
            names.add(name)
            eval_records.append(record(example, job, greedy, content=content, variant=name))

    train = job.train
    answer = pb.common.SamplingParams(
        temperature=recipe.temperature,
        n=1 if recipe.temperature == 0 else recipe.samples_per_prompt,
        max_tokens=p.max_tokens,
        logprobs=p.top_k,
    )
    scored: list[pb.common.PromptRecord] = []
    if recipe.references and any(e.reference is not None for e in train):
        # best: a few prompts answered by the teacher (best-of-n, verified), the referenced rest scored.
        answered = train[: p.best_generated]
        with_reference = [e for e in train[p.best_generated :] if e.reference is not None]
        scored = [record(e, job, pb.common.SamplingParams(logprobs=p.top_k), score_reference=True)
                  for e in with_reference[: p.score_prompts]]  # fmt: skip
    else:
        answered = train[: p.generate_prompts]
    generated = [record(e, job, answer) for e in answered]
    used = len(generated) + len(scored)
    return Plan(
        eval_records=eval_records,
        train_records=interleave(generated, scored),
        eval_prompts=len(held_out),
        generated_prompts=len(generated),
        scored_prompts=len(scored),
        variants=sorted(names),
        unused_train=len(train) - used,
    )


def interleave(a: list[pb.common.PromptRecord], b: list[pb.common.PromptRecord]) -> list[pb.common.PromptRecord]:
    """`a` spread evenly through `b`, so the trainer sees both kinds from the start."""
    if not a or not b:
        return [*a, *b]
    every = -(-(len(a) + len(b)) // len(a))
    out: list[pb.common.PromptRecord] = []
    rest = list(a)
    for i, item in enumerate(b):
        if i % every == 0 and rest:
            out.append(rest.pop(0))
        out.append(item)
    return out + rest
