"""Judges: whether a completion answers a prompt correctly, given the prompt's reference. Chosen by one spec string.

    exact                 the whole completion equals the reference
    numeric               the number after the last "answer is" (else the last number) equals the reference's
    regex:PATTERN         the first match's first group (the whole match without groups) equals the reference
    choice                the chosen option letter (A–J: "(B)", "B)", "answer is B", a lone "B") equals the reference's
    python:MODULE:FUNC    a callable (completion, reference) -> bool from an importable module

Text comparisons (exact, regex, choice) ignore case, surrounding whitespace, runs of whitespace and trailing
punctuation, because models answer "Positive." where the reference says "positive". A python checker that raises
counts the answer as wrong (and logs the first such error), so one odd completion cannot stop a run.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

KINDS = ("exact", "numeric", "regex:PATTERN", "choice", "python:MODULE:FUNCTION")

_ANSWER_RE = re.compile(r"answer\s*(?:is|:|=)?\s*[:=]?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CHOICE_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-J])\b\)?", re.IGNORECASE),
    re.compile(r"\(([A-J])\)"),
    re.compile(r"(?:^|\s)([A-J])[).:](?:\s|$)"),
    re.compile(r"^\s*([A-J])\s*$"),
    re.compile(r"\b([A-J])\b"),
)
_TRAILING = ".!?,;:\"'`"


class CheckerError(ValueError):
    """A checker spec that cannot be used; the message names the spec and says why."""


def normalize(text: str) -> str:
    """Case-folded, whitespace collapsed, trailing punctuation dropped: "  Positive. " → "positive"."""
    return " ".join(text.split()).casefold().rstrip(_TRAILING).strip()


def extract_number(text: str) -> str | None:
    """The final answer of a worked solution: the number after the last "answer is", else the last number."""
    candidates = _ANSWER_RE.findall(text) or _NUMBER_RE.findall(text)
    if not candidates:
        return None
    value = candidates[-1].replace(",", "")
    try:
        number = float(value)
    except ValueError:
        return None
    return str(int(number)) if number == int(number) else str(number)


def extract_choice(text: str) -> str | None:
    """The option letter a completion chose, by the most explicit pattern that matches."""
    for pattern in _CHOICE_PATTERNS:
        found = pattern.search(text)
        if found:
            return found.group(1).upper()
    return None


@dataclass(frozen=True)
class Checker:
    """A parsed spec; call it as `checker(completion, reference) -> bool`."""

    spec: str
    judge: Callable[[str, str], bool]

    def __call__(self, completion: str, reference: str) -> bool:
        return self.judge(completion, reference)


def _exact(completion: str, reference: str) -> bool:
    return normalize(completion) == normalize(reference)


def _numeric(completion: str, reference: str) -> bool:
    got = extract_number(completion)
    return got is not None and got == extract_number(reference)


def _choice(completion: str, reference: str) -> bool:
    got = extract_choice(completion)
    return got is not None and got == extract_choice(reference)


def _regex(pattern: re.Pattern[str]) -> Callable[[str, str], bool]:
    def judge(completion: str, reference: str) -> bool:
        found = pattern.search(completion)
        if found is None:
            return False
        answer = found.group(1) if pattern.groups else found.group(0)
        return answer is not None and normalize(answer) == normalize(reference)

    return judge


def _python(spec: str, target: str, allowed_modules: Sequence[str] | None) -> Callable[[str, str], bool]:
    module_name, sep, function_name = target.rpartition(":")
    if not sep or not module_name or not function_name:
        raise CheckerError(f"checker={spec!r}: write python:MODULE:FUNCTION (e.g. python:my_checks:is_correct)")
    if allowed_modules is not None and not any(
        module_name == allowed or module_name.startswith(allowed + ".") for allowed in allowed_modules
    ):
        raise CheckerError(
            f"checker={spec!r}: module {module_name!r} is not an allowed checker module here "
            f"(allowed: {sorted(allowed_modules)}; the trainer's setting DISTILLERY_TRAINER_CHECKER_MODULES)"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises on import
        raise CheckerError(f"checker={spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise CheckerError(f"checker={spec!r}: {module_name} has no callable {function_name!r}")
    warned = False

    def judge(completion: str, reference: str) -> bool:
        nonlocal warned
        try:
            return bool(function(completion, reference))
        except Exception as exc:
            if not warned:
                warned = True
                logger.warning(
                    "checker raised; the answer counts as wrong", extra={"checker": spec, "error": repr(exc)}
                )
            return False

    return judge


def parse_checker(spec: str, allowed_modules: Sequence[str] | None = None) -> Checker:
    """A `Checker` from its spec string; raises CheckerError naming the spec.

    `allowed_modules`: the modules (and their submodules) a `python:` checker may come from; None allows any
    (a user's own command line), a service passes its setting so a remote caller cannot pick arbitrary code.
    """
    kind, _, rest = spec.partition(":")
    if kind == "exact" and not rest:
        return Checker(spec, _exact)
    if kind == "numeric" and not rest:
        return Checker(spec, _numeric)
    if kind == "choice" and not rest:
        return Checker(spec, _choice)
    if kind == "regex":
        if not rest:
            raise CheckerError(f"checker={spec!r}: give a pattern, e.g. regex:(?i)\\b(yes|no)\\b")
        try:
            pattern = re.compile(rest)
        except re.error as exc:
            raise CheckerError(f"checker={spec!r}: not a valid regular expression: {exc}") from None
        return Checker(spec, _regex(pattern))
    if kind == "python":
        return Checker(spec, _python(spec, rest, allowed_modules))
    raise CheckerError(f"checker={spec!r}: must be one of {', '.join(KINDS)}")
