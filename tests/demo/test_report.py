"""The demo report: summary arithmetic, goals, and the files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.demo.report import DemoResult, summary, write_report


def _result(**overrides: object) -> DemoResult:
    base = DemoResult(
        profile="unit",
        teacher_model="teacher",
        recipe="kd",
        use_case="sums",
        checker="numeric",
        teacher_accuracy=0.18,
        teacher_accuracy_best_prompt=0.20,
        teacher_accuracy_by_variant={"": 0.18, "no_system": 0.20},
        student_accuracy=0.30,
        student_agreement=0.4,
        tokens_by_source={"generated": 300, "scored_student": 100},
        teacher_params=134_515_008,
        student_params=17_300_000,
        teacher_tokens_per_s=200.0,
        student_tokens_per_s=1600.0,
        stream_wpm=[300.0, 500.0, 700.0],
        swaps=3,
        machine_price_per_hour=0.5,
        history=[{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}],
        evals=[
            {"step": 2, "accuracy": 0.3, "teacher_accuracy": 0.2, "kl": 0.5, "top1_agreement": 0.6, "perplexity": 4.0}
        ],
        phases={"distil": 12.34},
        wall_s=99.94,
    )
    for key, value in overrides.items():
        setattr(base, key, value)
    return base


def test_summary_ratios_goals_and_cost_estimate() -> None:
    s = summary(_result())
    # The student is compared with the teacher at its best phrasing (0.20), not the one it was trained with (0.18).
    assert s["accuracy_ratio"] == pytest.approx(1.5)
    assert (s["metric"], s["teacher_score"], s["student_score"]) == ("accuracy", 0.20, 0.30)
    assert s["score_ratio"] == pytest.approx(1.5) and s["teacher_accuracy_best_prompt"] == 0.20
    assert s["signal_share"] == {"generated": 0.75, "scored_reference": 0.0, "scored_student": 0.25, "reference": 0.0}
    assert s["size_ratio"] == pytest.approx(134_515_008 / 17_300_000)
    assert s["speed_ratio"] == pytest.approx(8.0)
    goals = s["goals"]
    assert goals["accuracy_ratio_ge_0.968"] is True and goals["student_beats_teacher_best_prompt"] is True
    assert goals["size_ratio_ge_7.5"] is True
    assert goals["speed_ratio_ge_9.4"] is False
    assert goals["every_stream_ge_238_wpm"] is True and goals["zero_failed_requests"] is True
    # $0.5/h at 200 tok/s = 720,000 tokens/h → $0.694 per million; the student is 8× cheaper.
    cost = s["cost_estimate"]
    assert cost["teacher_usd_per_million_tokens"] == pytest.approx(0.5 / 720_000 * 1e6)
    assert cost["student_usd_per_million_tokens"] == pytest.approx(cost["teacher_usd_per_million_tokens"] / 8)
    assert "estimate" in cost["label"]
    assert s["stream_wpm_p50"] == 500.0 and s["streams_below_target"] == 0
    assert s["wall_s"] == 99.9 and s["phases_s"] == {"distil": 12.3}


def test_missing_measurements_are_unknown_not_zero() -> None:
    s = summary(_result(teacher_accuracy_best_prompt=None, student_tokens_per_s=None, stream_wpm=[], failed_requests=2,
                        tokens_by_source={}))  # fmt: skip
    assert s["signal_share"]["generated"] == 0.0
    assert s["accuracy_ratio"] is None and s["goals"]["accuracy_ratio_ge_0.968"] is None
    assert s["speed_ratio"] is None and s["cost_estimate"]["student_usd_per_million_tokens"] is None
    assert s["goals"]["every_stream_ge_238_wpm"] is False  # no stream served proves nothing
    assert s["goals"]["zero_failed_requests"] is False


def test_slow_stream_counts_below_target() -> None:
    s = summary(_result(stream_wpm=[100.0, 400.0]))
    assert s["streams_below_target"] == 1 and s["goals"]["every_stream_ge_238_wpm"] is False


def test_write_report_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    data = write_report(_result(notes=["a note"]), tmp_path)
    full = json.loads((tmp_path / "report.json").read_text())
    assert full["accuracy_ratio"] == data["accuracy_ratio"] and full["history"][1]["loss"] == 2.0
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "| held-out accuracy (checker `numeric`) | 0.200 at its best phrasing (as trained 0.180, no_system 0.200) |"
        " 0.300 | 1.500 |" in markdown
    )
    assert "(`scored_student`) | 100 | 25.0% |" in markdown
    assert "estimate" in markdown and "- a note" in markdown
    for name in ("training.png", "wpm.png", "teacher_vs_student.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in markdown


def test_without_a_checker_the_score_is_agreement_with_the_teacher(tmp_path: Path) -> None:
    s = write_report(_result(checker="", student_accuracy=None, teacher_accuracy_best_prompt=None), tmp_path)
    assert (s["metric"], s["teacher_score"], s["student_score"]) == ("teacher_agreement", 1.0, 0.4)
    assert s["score_ratio"] == pytest.approx(0.4) and s["accuracy_ratio"] is None
    assert "agreement with the teacher's answers (no checker)" in (tmp_path / "report.md").read_text()


def test_a_restricted_output_vocabulary_is_reported(tmp_path: Path) -> None:
    """Its rows and coverage figures in the summary and a row of the report's table; absent (None) without one."""
    assert summary(_result())["output_vocab_size"] is None
    assert "output vocabulary" not in (write_report(_result(), tmp_path) and (tmp_path / "report.md").read_text())
    data = write_report(_result(output_vocab_size=4096, output_vocab_coverage=0.995,
                                output_vocab_heldout_coverage=0.982), tmp_path)  # fmt: skip
    assert (data["output_vocab_size"], data["output_vocab_coverage"], data["output_vocab_heldout_coverage"]) == (
        4096, 0.995, 0.982)  # fmt: skip
    assert "| output vocabulary: rows" in (tmp_path / "report.md").read_text() and "4,096 (0.995 / 0.982)" in (
        tmp_path / "report.md").read_text()  # fmt: skip
