"""Which cores the demo gives each service."""

from __future__ import annotations

from services.common.vllm_engine import VllmSettings
from services.demo.pipeline import core_layout
from services.trainer.settings import TrainerSettings


def test_two_cores_give_the_teacher_one_of_its_own() -> None:
    assert core_layout([0, 1]) == {"teacher": "1", "serving": "0", "trainer": "0"}


def test_more_cores_give_each_engine_one_and_the_trainer_the_rest() -> None:
    assert core_layout([0, 1, 2, 3]) == {"teacher": "3", "serving": "2", "trainer": "0,1"}
    assert core_layout([2, 5, 7]) == {"teacher": "7", "serving": "5", "trainer": "2"}


def test_one_core_is_shared_and_the_trainer_left_unpinned() -> None:
    assert core_layout([3]) == {"teacher": "3", "serving": "3", "trainer": ""}


def test_every_layout_is_a_valid_setting() -> None:
    for cpus in ([0], [0, 1], [0, 1, 2], list(range(16))):
        layout = core_layout(cpus)
        VllmSettings(cpu_bind=layout["teacher"])
        VllmSettings(cpu_bind=layout["serving"])
        TrainerSettings(cpu_bind=layout["trainer"])
