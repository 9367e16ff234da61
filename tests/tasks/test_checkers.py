"""Each checker kind judges answers the way models write them; bad specs fail with a message naming the spec."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from services.tasks import CheckerError, parse_checker


@pytest.mark.parametrize(
    ("spec", "completion", "reference", "correct"),
    [
        ("exact", "  Paris. ", "paris", True),
        ("exact", "The capital is Paris.", "Paris", False),
        ("exact", "New   York", "new york", True),
        ("numeric", "3 + 5 = 8. The answer is 8.", "3 + 5 = 8. The answer is 8.", True),
        ("numeric", "The answer is: 590", "590", True),
        ("numeric", "They sold 1,200 cookies in total.", "1200", True),
        ("numeric", "Answer = 12.0", "12", True),
        ("numeric", "The answer is 7.", "8", False),
        ("numeric", "I don't know.", "8", False),
        ("numeric", "", "8", False),
        ("numeric", "Sam had 3 and bought 5, so 8 apples; the answer is 8 apples.", "8", True),
        ("numeric", "8 apples, but the answer is 9", "9", True),
        ("regex:(?i)\\b(positive|negative)\\b", "The review is Positive.", "positive", True),
        ("regex:(?i)\\b(positive|negative)\\b", "The review is negative.", "positive", False),
        ("regex:(?i)\\b(positive|negative)\\b", "I cannot tell.", "positive", False),
        ("regex:\\d+", "about 42 of them", "42", True),
        ("choice", "The answer is (B).", "B", True),
        ("choice", "B) because it is larger", "B", True),
        ("choice", "C", "(C)", True),
        ("choice", "I think the answer is A.", "D", False),
        ("choice", "none of them", "A", False),
    ],
)
def test_checker_kinds(spec: str, completion: str, reference: str, correct: bool) -> None:
    assert parse_checker(spec)(completion, reference) is correct


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_checks.py").write_text(
        textwrap.dedent(
            """
            def same_word(completion, reference):
                return reference.lower() in completion.lower().split()

            def broken(completion, reference):
                raise RuntimeError("oops")

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_checks"
    sys.modules.pop("my_checks", None)


def test_python_checker_calls_the_users_function(user_module: str) -> None:
    check = parse_checker(f"python:{user_module}:same_word")
    assert check("it is Paris", "paris") and not check("it is London", "paris")


def test_a_python_checker_that_raises_counts_as_wrong(user_module: str) -> None:
    assert parse_checker(f"python:{user_module}:broken")("x", "y") is False


def test_python_checkers_only_from_allowed_modules(user_module: str) -> None:
    with pytest.raises(CheckerError, match="not an allowed checker module"):
        parse_checker("python:os:system", allowed_modules=[user_module])
    with pytest.raises(CheckerError, match="not an allowed checker module"):
        parse_checker(f"python:{user_module}:same_word", allowed_modules=[])
    assert parse_checker(f"python:{user_module}:same_word", allowed_modules=[user_module])("a b", "b")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fuzzy", "must be one of exact, numeric"),
        ("regex:", "give a pattern"),
        ("regex:(unclosed", "not a valid regular expression"),
        ("python:nope_no_such_module:f", "cannot import 'nope_no_such_module'"),
        ("python:justamodule", "write python:MODULE:FUNCTION"),
        ("numeric:extra", "must be one of"),
    ],
)
def test_bad_specs_name_the_spec(spec: str, message: str) -> None:
    with pytest.raises(CheckerError, match=message) as info:
        parse_checker(spec)
    assert repr(spec) in str(info.value)


def test_python_checker_function_must_exist_and_be_callable(user_module: str) -> None:
    with pytest.raises(CheckerError, match="no callable 'missing'"):
        parse_checker(f"python:{user_module}:missing")
    with pytest.raises(CheckerError, match="no callable 'NOT_CALLABLE'"):
        parse_checker(f"python:{user_module}:NOT_CALLABLE")
