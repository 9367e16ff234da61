"""Prompt files and task problems → prompt records: good lines parse, bad lines say which line and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common import pb
from services.tasks import Content, Example
from services.tasks.builtin import get_builtin
from services.teacher.prompts import BadLine, example_record, read_jsonl, record_from_json, validate_prompt_record


def test_jsonl_lines_parse_and_bad_lines_report_their_numbers(tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt_id": "a", "messages": [{"role": "user", "content": "2+2?"}], "task": "sums",
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


def test_records_with_a_student_completion_to_score_need_no_content() -> None:
    score = pb.common.StudentCompletion(prompt_token_ids=[1, 2], completion_token_ids=[3], run_id="r", student_step=1)
    validate_prompt_record(pb.common.PromptRecord(prompt_id="p", score_completion=score))
    with pytest.raises(ValueError, match="prompt_id"):
        validate_prompt_record(pb.common.PromptRecord(score_completion=score))


def test_prompts_file_lines_become_records_with_their_phrasing_and_reference() -> None:
    examples = get_builtin("math_word_problems").generate(2, 2, 3)
    sampling = pb.common.SamplingParams(temperature=0.8, n=4)
    for example in examples:
        record = example_record(example, "sums", sampling)
        validate_prompt_record(record)
        assert (record.prompt_id, record.task, record.reference_answer) == (example.id, "sums", example.reference)
        assert [(m.role, m.content) for m in record.chat.messages] == list(example.content.messages)
        assert record.sampling.n == 4 and record.prompt_variant == ""
        assert record.split == (pb.common.SPLIT_EVAL if example.split == "eval" else pb.common.SPLIT_TRAIN)
        assert record.metadata["facts"] == example.metadata["facts"]
    # The math task's declared phrasing adds its system prompt to the question alone (the student's phrasing).
    instructions = examples[0].variants["instructions"]
    variant = example_record(examples[0], "sums", content=instructions, variant="instructions", score_reference=True)
    assert [m.role for m in variant.chat.messages] == ["system", "user"] and variant.prompt_variant == "instructions"
    assert variant.score_reference
    raw = example_record(Example("t", Content(prompt="plain text")), "sums")
    assert raw.text == "plain text" and not raw.HasField("reference_answer")
