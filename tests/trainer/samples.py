"""Teacher samples made in tests from a tiny teacher's own logits (transformers), published as real records."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from services.common import pb
from services.common.kafka import ProtoProducer
from services.common.models import load_causal_lm, load_tokenizer
from services.common.settings import KafkaSettings
from services.tasks.builtin import DEFAULT_TASK, get_builtin

TASK = DEFAULT_TASK
#: The checker the samples' references are judged with (a RunSpec's `checker`).
CHECKER = get_builtin(TASK).checker


def make_samples(
    teacher_dir: Path,
    n_train: int,
    n_eval: int,
    *,
    top_k: int = 5,
    max_new_tokens: int = 10,
    seed: int = 0,
    sharpen: float = 8.0,
) -> list[pb.common.TeacherSample]:
    """Greedy completions of seed-task prompts with the teacher's top-k log-probs at every generated position.

    A random tiny model is nearly uniform; its logits are multiplied by `sharpen` so the top-k hold real mass.
    """
    problems = get_builtin(TASK).generate(n_train, n_eval, seed)
    model = load_causal_lm(teacher_dir, dtype=torch.float32)
    tok = load_tokenizer(teacher_dir)
    out = []
    for problem in problems:
        prompt = tok.apply_chat_template(problem.content.chat(), add_generation_prompt=True, tokenize=True)
        if not isinstance(prompt, list):
            prompt = prompt["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        completion = gen.sequences[0, len(prompt) :].tolist()
        logits = torch.stack(gen.logits, dim=1)[0].float()[: len(completion)]  # (C, V)
        logprobs = (logits * sharpen).log_softmax(-1)
        top = logprobs.topk(top_k, dim=-1)
        sampled = logprobs.gather(-1, torch.tensor(completion)[:, None])[:, 0]
        split = pb.common.SPLIT_EVAL if problem.split == "eval" else pb.common.SPLIT_TRAIN
        sample = pb.common.TeacherSample(
            sample_id=hashlib.sha256(f"{problem.id}/{seed}".encode()).hexdigest(),
            prompt_id=problem.id,
            task=TASK,
            split=split,
            teacher_model="tiny-teacher",
            teacher_revision="test",
            completion_text=tok.decode(completion, skip_special_tokens=True),
            top_k=top_k,
            finish_reason=pb.common.FINISH_REASON_LENGTH,
            reference_answer=problem.reference,
            source=pb.common.SAMPLE_SOURCE_GENERATED,
            sampling=pb.common.SamplingParams(temperature=0.0),
        )
        sample.prompt_token_ids.extend(prompt)
        sample.completion_token_ids.extend(completion)
        sample.sampled_logprobs.extend(sampled.tolist())
        sample.top_ids.extend(top.indices.reshape(-1).tolist())
        sample.top_logprobs.extend(top.values.reshape(-1).tolist())
        out.append(sample)
    return out


def publish(kafka: KafkaSettings, samples: list[pb.common.TeacherSample]) -> None:
    producer = ProtoProducer(kafka, "test-teacher")
    try:
        for s in samples:
            producer.send(kafka.topic_teacher_samples, s.prompt_id, s)
        producer.flush(30)
    finally:
        producer.close()


def publish_raw(kafka: KafkaSettings, values: list[bytes]) -> None:
    producer = ProtoProducer(kafka, "test-garbage")
    try:
        for v in values:
            producer.send_raw(kafka.topic_teacher_samples, b"garbage", v, [])
        producer.flush(30)
    finally:
        producer.close()
