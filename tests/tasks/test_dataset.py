"""Prompts as data: JSONL lines parsed, every problem reported with its line number and field, splits reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.tasks.dataset import DatasetError, assign_splits, counts, hash_split, read_examples, write_examples


def write(path: Path, *lines: object) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


def test_both_line_forms_parse_with_their_optional_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p.jsonl",
        {"id": "a", "messages": CHAT, "reference": "Paris", "split": "eval"},
        "",
        {"id": 7, "prompt": "Translate: chat", "variants": {"polite": "Please translate: chat"}},
        {"id": "c", "prompt": "x", "reference": 42, "metadata": {"source": "web", "n": 3}},
    )
    a, b, c = read_examples(path)
    assert a.content.chat() == CHAT and a.reference == "Paris" and a.split == "eval"
    assert b.id == "7" and b.content.prompt == "Translate: chat" and b.split is None
    assert b.variants["polite"].prompt == "Please translate: chat"
    assert c.reference == "42" and c.metadata == {"source": "web", "n": "3"}
    assert a.content.without_system().chat() == CHAT[1:]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "p.jsonl:2: not JSON"),
        ({"prompt": "x"}, "p.jsonl:2: id: required"),
        ({"id": "b"}, "p.jsonl:2: messages: give exactly one of messages or prompt"),
        ({"id": "b", "prompt": "x", "messages": CHAT}, "give exactly one"),
        ({"id": "b", "prompt": "   "}, "p.jsonl:2: prompt: must be a non-empty string"),
        ({"id": "b", "messages": [{"role": "bot", "content": "hi"}]}, "messages\\[0\\].role: 'bot' is not one of"),
        ({"id": "b", "messages": [{"role": "user", "content": 3}]}, "messages\\[0\\].content: must be a string"),
        (
            {"id": "b", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "messages\\[1\\].role: the last message must be the user's",
        ),
        ({"id": "b", "prompt": "x", "split": "test"}, "split: 'test' is not one of train, eval"),
        ({"id": "b", "prompt": "x", "refrence": "y"}, "refrence: unknown field"),
        ({"id": "b", "prompt": "x", "reference": ""}, "reference: must not be empty"),
        ({"id": "b", "prompt": "x", "reference": [1]}, "reference: must be a string or a number"),
        ({"id": "a", "prompt": "x"}, "p.jsonl:2: id: 'a' is also the id of line 1"),
        ([1, 2], "line: must be a JSON object"),
    ],
)
def test_bad_lines_name_line_and_field(tmp_path: Path, line: object, message: str) -> None:
    path = write(tmp_path / "p.jsonl", {"id": "a", "prompt": "ok"}, line)
    with pytest.raises(DatasetError, match=message):
        read_examples(path)


def test_every_bad_line_is_listed_not_just_the_first(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", {"prompt": "x"}, {"id": "ok", "prompt": "x"}, "{", {"id": "z"})
    with pytest.raises(DatasetError) as info:
        read_examples(path)
    assert [p.split(":")[1] for p in info.value.problems] == ["1", "3", "4"]


def test_empty_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="no prompts"):
        read_examples(write(tmp_path / "empty.jsonl", ""))
    (tmp_path / "bin.jsonl").write_bytes(b'{"id": "a", "prompt": "\xff"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_examples(tmp_path / "bin.jsonl")


def test_an_eval_file_forces_its_split_and_refuses_train_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "e.jsonl", {"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "split": "eval"})
    assert [e.split for e in read_examples(path, force_split="eval")] == ["eval", "eval"]
    bad = write(tmp_path / "bad.jsonl", {"id": "a", "prompt": "x", "split": "train"})
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: split: 'train' in a file whose lines are all 'eval'"):
        read_examples(bad, force_split="eval")


def test_split_is_seeded_by_id_reproducible_and_about_the_fraction(tmp_path: Path) -> None:
    lines = [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(2000)]
    lines[0]["split"] = "train"  # an explicit split is kept
    examples = read_examples(write(tmp_path / "p.jsonl", *lines))
    first = assign_splits(examples, 0.1, seed=0)
    assert first == assign_splits(list(reversed(examples)), 0.1, seed=0)[::-1]  # independent of file order
    assert first[0].split == "train"
    share = counts(first)["eval"] / len(first)
    assert 0.08 < share < 0.12
    assert all(e.split == hash_split(e.id, 0.1, 0) for e in first[1:])
    assert assign_splits(examples, 0.1, seed=1) != first


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", {"id": "a", "messages": CHAT, "reference": "Paris", "split": "eval",
                                        "variants": {"v": CHAT[1:]}, "metadata": {"k": "v"}})  # fmt: skip
    examples = read_examples(path)
    write_examples(tmp_path / "out.jsonl", examples)
    assert read_examples(tmp_path / "out.jsonl") == examples
