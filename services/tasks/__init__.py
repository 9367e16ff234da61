"""Use cases as data: JSONL prompts (`dataset`), checkers that judge answers (`checkers`), built-in generators."""

from services.tasks.checkers import Checker, CheckerError, parse_checker
from services.tasks.dataset import Content, DatasetError, Example, read_examples

__all__ = ["Checker", "CheckerError", "Content", "DatasetError", "Example", "parse_checker", "read_examples"]
