"""The held-out set: the teacher judged per phrasing (compared at its best), greedy answers kept for agreement,
the student's prompts in the phrasing it is trained with; state survives a checkpoint round trip."""

from __future__ import annotations

import json

import pytest

from services.common import pb
from services.tasks import parse_checker
from services.trainer.evalset import EvalSet
from services.trainer.evaluate import same_answer, score_answers


def _sample(prompt: str, text: str, variant: str = "", temperature: float | None = 0.0) -> pb.common.TeacherSample:
    s = pb.common.TeacherSample(sample_id=f"{prompt}/{variant}/{text}", prompt_id=prompt, completion_text=text,
                                prompt_variant=variant, reference_answer="The answer is 8.", top_k=1,
                                split=pb.common.SPLIT_EVAL)  # fmt: skip
    if temperature is not None:
        s.sampling.temperature = temperature
    s.prompt_token_ids.extend([1, 2, 3] if not variant else [2, 3])
    s.completion_token_ids.append(5)
    s.top_ids.append(5)
    s.top_logprobs.append(-0.1)
    return s


def test_teacher_accuracy_per_phrasing_and_the_best_one() -> None:
    evalset = EvalSet(max_prompts=10, max_samples=10, checker=parse_checker("numeric"))
    for prompt, primary, bare in (("a", "8", "8"), ("b", "7", "8"), ("c", "6", "8"), ("d", "8", "1")):
        evalset.add(_sample(prompt, f"The answer is {primary}."))
        evalset.add(_sample(prompt, f"So {bare}.", variant="no_system"))
    assert evalset.teacher_accuracy_by_variant() == {"": 0.5, "no_system": 0.75}
    assert evalset.teacher_accuracy() == 0.5 and evalset.teacher_accuracy_best_prompt() == 0.75
    # The student answers each prompt once, in its own phrasing; only those samples feed the token-level agreement.
    assert [p.prompt_token_ids for p in evalset.student_prompts()] == [[1, 2, 3]] * 4
    assert all(s.prompt_variant == "" for s in evalset.samples)


def test_a_greedy_answer_is_the_one_agreement_compares_with() -> None:
    evalset = EvalSet(max_prompts=10, max_samples=10, checker=None)
    evalset.add(_sample("a", "sampled", temperature=0.8))
    evalset.add(_sample("a", "greedy"))
    evalset.add(_sample("a", "sampled again", temperature=1.0))
    (prompt,) = evalset.student_prompts()
    assert prompt.teacher_text == "greedy" and prompt.teacher_greedy
    assert evalset.teacher_accuracy_best_prompt() is None  # no checker: nothing judged


def test_a_prompt_seen_first_in_another_phrasing_waits_for_its_own() -> None:
    evalset = EvalSet(max_prompts=10, max_samples=10, checker=None)
    evalset.add(_sample("a", "x", variant="no_system"))
    assert evalset.student_prompts() == [] and not evalset.ready(1)
    evalset.add(_sample("a", "y"))
    assert evalset.ready(1) and evalset.student_prompts()[0].teacher_text == "y"


def test_state_round_trip_and_old_checkpoints() -> None:
    evalset = EvalSet(max_prompts=10, max_samples=10, checker=parse_checker("numeric"))
    evalset.add(_sample("a", "The answer is 8."))
    evalset.add(_sample("a", "9", variant="no_system"))
    again = EvalSet(10, 10, parse_checker("numeric"))
    again.load_state(json.loads(json.dumps(evalset.to_state())))
    assert again.teacher_accuracy_by_variant() == {"": 1.0, "no_system": 0.0}
    assert again.samples == evalset.samples
    old = EvalSet(10, 10, parse_checker("numeric"))  # a checkpoint written before phrasings were counted apart
    old.load_state({"prompts": [{"prompt_id": "a", "task": "t", "prompt_token_ids": [1], "reference": "8",
                                 "teacher_correct": 1, "teacher_total": 2}]})  # fmt: skip
    assert old.teacher_accuracy() == 0.5


def test_score_answers_accuracy_and_agreement() -> None:
    evalset = EvalSet(max_prompts=10, max_samples=10, checker=parse_checker("numeric"))
    for prompt, teacher in (("a", "The answer is 8."), ("b", "The answer is 7."), ("c", "The  answer is 8.")):
        evalset.add(_sample(prompt, teacher))
    prompts = evalset.student_prompts()
    answers = ["The answer is 8.", "The answer is 8.", "The answer is 8."]
    accuracy, agreement, shown = score_answers(prompts, answers, evalset.checker)
    assert accuracy == 1.0
    assert agreement == pytest.approx(2 / 3)  # c differs only in whitespace: it agrees
    assert shown[1] == {"prompt_id": "b", "answer": "The answer is 8.", "teacher": "The answer is 7."}
    no_checker = score_answers(prompts, answers, None)
    assert no_checker[0] is None and no_checker[1] == agreement
    assert same_answer(" a\nb ", "a b") and not same_answer("a b", "ab")
