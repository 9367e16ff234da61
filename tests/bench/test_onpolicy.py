"""`distillery bench onpolicy`: the stop-at-deadline clock, the bench's profile and student, the result arithmetic and
the command's argument checks (the whole bench runs in test_onpolicy_bench.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from services.bench.onpolicy import MAX_STEPS, bench_profile, ratio, ratios, side, student_override
from services.bench.onpolicy_trl import DeadlineClock, prompt_rows
from services.cli import app
from services.common import pb
from services.demo.load import ClientLoad
from services.demo.profiles import DEFAULT, SMOKE
from services.demo.profiles import _pruned as pruned


class FakeClock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_deadline_clock_stops_at_the_first_step_ending_at_or_after_the_wall_time() -> None:
    clock = DeadlineClock(10.0, FakeClock(100.0, 103.0, 109.9, 110.0))
    clock.begin()
    assert [clock.step_ended(), clock.step_ended(), clock.step_ended()] == [False, False, True]
    assert clock.steps == 3 and clock.seconds == 10.0


def test_deadline_clock_counts_the_step_in_flight_past_the_deadline() -> None:
    clock = DeadlineClock(5.0, FakeClock(0.0, 7.5))
    clock.begin()
    assert clock.step_ended() and clock.steps == 1 and clock.seconds == 7.5


def test_deadline_clock_refuses_a_wall_time_that_is_not_positive_and_a_step_before_the_start() -> None:
    with pytest.raises(ValueError, match="wall_s=0"):
        DeadlineClock(0.0)
    with pytest.raises(RuntimeError, match="before begin"):
        DeadlineClock(1.0).step_ended()


def test_deadline_callback_sets_should_training_stop_as_transformers_reads_it() -> None:
    from transformers import TrainerControl

    clock = DeadlineClock(2.0, FakeClock(0.0, 1.0, 2.5, 2.6))
    callback = clock.callback()
    control = TrainerControl()
    callback.on_train_begin(None, None, control)
    callback.on_step_end(None, None, control)
    assert not control.should_training_stop
    callback.on_step_end(None, None, control)
    assert control.should_training_stop
    callback.on_train_end(None, None, control)
    assert clock.seconds == 2.5  # the end is the deadline step's, not on_train_end's


def test_prompt_rows_are_trl_prompt_only_rows_of_chats_or_texts() -> None:
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    assert prompt_rows([chat, "raw text"]) == [{"prompt": chat}, {"prompt": "raw text"}]


def test_bench_profile_is_stopped_by_training_wall_time_without_client_load() -> None:
    profile = bench_profile(DEFAULT, 600.0)
    assert (profile.max_steps, profile.eval_every_steps) == (MAX_STEPS, MAX_STEPS)
    assert profile.time_budget_s == 600.0 and profile.budget_from_first_step and profile.load_streams == 0
    # Everything else is the demo's profile.
    assert (profile.batch_size, profile.learning_rate, profile.on_policy) == (
        DEFAULT.batch_size, DEFAULT.learning_rate, DEFAULT.on_policy)  # fmt: skip
    with pytest.raises(ValueError, match="wall_s=-1"):
        bench_profile(SMOKE, -1.0)


def test_student_is_the_default_one_with_the_full_vocabulary_or_the_profiles_own() -> None:
    from services.demo.job import student_recipe
    from services.trainer.recipes import DEFAULT_STUDENT_RECIPE, with_defaults

    recipe = student_recipe(student_override(DEFAULT) or "")
    filled = with_defaults(pb.trainer.RunSpec(student=recipe)).student
    assert filled.pruned == DEFAULT_STUDENT_RECIPE.pruned and filled.output_vocab_coverage == 0
    assert student_override(SMOKE) is None
    restricted = pruned(1, 64, 128, 1, 1)
    restricted.output_vocab_coverage = 0.99
    from dataclasses import replace

    with pytest.raises(ValueError, match="restricted output vocabulary"):
        student_override(replace(SMOKE, student=restricted))


def test_sides_and_ratios_are_ours_over_trl_with_missing_figures_null() -> None:
    ours = side({"accuracy": 0.05, "kl": 1.2, "top1_agreement": 0.6, "teacher_agreement": 0.1}, 500, 30_000, 600.0)
    trl = side({"accuracy": 0.0, "kl": 2.4, "top1_agreement": 0.3, "teacher_agreement": 0.05}, 200, 12_000, 600.5)
    assert ours["tokens_per_s"] == 50.0 and trl["tokens_per_s"] == 20.0
    assert ours["held_out"]["perplexity"] is None
    got = ratios(ours, trl)
    assert got["tokens_per_s"] == 2.5 and got["steps"] == 2.5
    assert got["kl"] == 0.5 and got["top1_agreement"] == 2.0 and got["teacher_agreement"] == 2.0
    assert got["accuracy"] is None and got["perplexity"] is None  # TRL's 0, and a figure neither side has
    assert ratio(None, 1.0) is None and ratio(1.0, None) is None
    assert side({}, 0, 0, 0.0)["tokens_per_s"] is None


def test_client_load_of_zero_streams_starts_nothing() -> None:
    load = ClientLoad("127.0.0.1:1", [[{"role": "user", "content": "Hi"}]], 0, 8, 0.0, 0.0)
    load.start()
    load.stop()
    assert load.results() == [] and load.error is None


@pytest.mark.parametrize(
    ("args", "option"),
    [(["--wall-s", "0"], "--wall-s"), (["--on-policy-fraction", "1.5"], "--on-policy-fraction"),
     (["--profile", "full"], "--profile")],
)  # fmt: skip
def test_bad_arguments_are_usage_errors_naming_the_option(args: list[str], option: str) -> None:
    result = CliRunner().invoke(app, ["bench", "onpolicy", *args])
    assert result.exit_code == 2
    assert option in result.output
