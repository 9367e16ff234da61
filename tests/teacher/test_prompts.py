"""Prompt files and task problems → prompt records: good lines parse, bad lines say which line and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common import pb
from services.tasks import get_task
from services.teacher.prompts import BadLine, problem_record, read_jsonl, record_from_json, validate_prompt_record


def test_jsonl_lines_parse_and_bad_lines_report_their_numbers(tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt_id": "a", "messages": [{"role": "user", "content": "2+2?"}], "task": "math_word_problems",
                    "reference_answer": 4, "split": "eval", "sampling": {"temperature": 0.5, "n": 2,
                    "extra": {"ignore_eos": True}}}),
        "",
        json.dumps({"prompt_id": "b", "text": "Once upon a time"}),
        "{not json",
        json.dumps({"prompt_id": "", "text": "x"}),
        json.dumps({"prompt_id": "c", "text": "x", "messages": []}),
        json.dumps({"prompt_id": "d", "text": "x", "split": "test"}),
        json.dumps({"prompt_id": "e", "text": "x", "sampling": {"temprature": 1}}),
        json.dumps({"prompt_id": "f", "text": "x", "colour": "red"}),
    ]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items = dict(read_jsonl(path))
    good = {n: r for n, r in items.items() if not isinstance(r, BadLine)}
    bad = {n: r for n, r in items.items() if isinstance(r, BadLine)}
    assert sorted(good) == [1, 3]
    a = good[1]
    assert a.chat.messages[0].content == "2+2?" and a.reference_answer == "4" and a.split == pb.common.SPLIT_EVAL
    assert a.sampling.n == 2 and a.sampling.temperature == pytest.approx(0.5)
    assert a.sampling.extra["ignore_eos"] == "true"
    assert a.HasField("created_at")
    assert good[3].text == "Once upon a time"
    assert sorted(bad) == [4, 5, 6, 7, 8, 9]
    assert "not JSON" in bad[4].error
    assert "prompt_id" in bad[5].error
    assert "exactly one of messages or text" in bad[6].error
    assert "split='test'" in bad[7].error
    assert "sampling" in bad[8].error
    assert "colour" in bad[9].error


def test_records_need_an_id_and_content() -> None:
    with pytest.raises(ValueError, match="prompt_id"):
        validate_prompt_record(pb.common.PromptRecord(text="x"))
    with pytest.raises(ValueError, match="content"):
        validate_prompt_record(pb.common.PromptRecord(prompt_id="p"))
    with pytest.raises(ValueError, match="expected a JSON object"):
        record_from_json(["not", "an", "object"])


def test_task_problems_become_chat_records_with_reference_answers() -> None:
    task = get_task("math_word_problems")
    train, held_out = task.generate(2, seed=3, split="train"), task.generate(2, seed=3, split="eval")
    sampling = pb.common.SamplingParams(temperature=0.8, n=4)
    for problem in train + held_out:
        record = problem_record(problem, sampling=sampling)
        validate_prompt_record(record)
        assert record.prompt_id == problem.prompt_id
        assert record.reference_answer == problem.answer
        assert [m.role for m in record.chat.messages] == [m["role"] for m in task.messages(problem)]
        assert record.sampling.n == 4
    assert problem_record(held_out[0]).split == pb.common.SPLIT_EVAL
    assert problem_record(train[0]).split == pb.common.SPLIT_TRAIN
