"""The benchmarks' cached default student follows the default recipe."""

from __future__ import annotations

import pytest

from services.bench import students
from services.common import pb
from services.trainer import recipes


def test_the_cache_names_the_default_recipe_so_a_changed_default_is_built_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = students.cache_name()
    assert now.startswith(f"{students.STUDENT_CACHE}-{recipes.DEFAULT_STUDENT_RECIPE.pruned.num_layers}x256-")
    other = pb.trainer.StudentRecipe()
    other.CopyFrom(recipes.DEFAULT_STUDENT_RECIPE)
    other.pruned.num_layers -= 2  # a folder cached for the old default must not be reused for a new one
    monkeypatch.setattr(recipes, "DEFAULT_STUDENT_RECIPE", other)
    assert students.cache_name() != now
    other.pruned.num_layers += 2
    other.output_vocab_coverage = 0.5
    assert students.cache_name() not in (now, "")


def test_describe_student_names_the_shape_and_the_head() -> None:
    text = recipes.describe_student(recipes.DEFAULT_STUDENT_RECIPE)
    p = recipes.DEFAULT_STUDENT_RECIPE.pruned
    assert f"{p.num_layers} layers, hidden {p.hidden_size}" in text and "output vocabulary at 0.99" in text
    assert "output vocabulary" not in recipes.describe_student(recipes.DEFAULT_STUDENT_RECIPE, head=False)
