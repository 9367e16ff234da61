"""Trainer settings that are checked before anything starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.trainer.settings import TrainerSettings


@pytest.mark.parametrize("spec", ["a", "1-x", "-1", "0,,1"])
def test_a_bad_cpu_binding_is_refused_naming_the_field(spec: str) -> None:
    with pytest.raises(ValidationError, match=f"cpu_bind={spec!r}"):
        TrainerSettings(cpu_bind=spec)


def test_cpu_binding_is_optional_and_takes_core_lists() -> None:
    assert TrainerSettings().cpu_bind == ""
    assert TrainerSettings(cpu_bind="0-1,3").cpu_bind == "0-1,3"
