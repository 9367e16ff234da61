"""The whole pipeline, end to end, as `make test` runs it: `distillery demo` and `distillery distil` on tiny models.

Real broker, real vLLM teacher and serving engines (tiny random Llama), real trainer, real gRPC between separate
processes; the report must say what the run did and that nothing failed. One run is the demo (the built-in use
case with its checker, recipe best); the other is a user's own JSONL without references or checker, distilled with
the teacher-only recipe (on-policy on), judged and gated by agreement with the teacher.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import READING_TARGET_WPM

pytestmark = pytest.mark.e2e

REQUIRED = ("metric", "teacher_score", "student_score", "score_ratio", "size_ratio", "speed_ratio", "promotions",
            "swaps", "failed_requests", "wall_s", "accuracy_ratio", "teacher_accuracy_best_prompt",
            "student_accuracy", "signal_share", "recipe")  # fmt: skip


@dataclass
class Pipeline:
    """One `distillery … --profile smoke --json` process, started before the test that reads it."""

    run_dir: Path
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def result(self) -> tuple[dict[str, Any], Path]:
        assert self.proc.wait(timeout=840) == 0, self.stderr.read_text(errors="replace")[-6000:]
        summary = json.loads(self.stdout.read_text().strip().splitlines()[-1])
        missing = [key for key in REQUIRED if key not in summary]
        assert not missing, missing
        return summary, self.run_dir


def _start(base: Path, *args: str) -> Pipeline:
    run_dir = base / "run"
    env = {k: v for k, v in os.environ.items() if k != "DISTILLERY_KAFKA_BOOTSTRAP"}  # it starts its own broker
    env.update(DISTILLERY_HOME=str(base / "home"), HF_HUB_OFFLINE="1")
    stdout, stderr = base / "stdout", base / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "distillery"), *args, "--profile", "smoke", "--json",
             "--run-dir", str(run_dir)],
            env=env, stdout=out, stderr=err,
        )  # fmt: skip
    return Pipeline(run_dir, proc, stdout, stderr)


def _users_prompts(path: Path) -> Path:
    lines: list[dict[str, Any]] = [
        {"id": f"q{i}", "messages": [{"role": "user", "content": f"Tell me about the number {i}."}]} for i in range(60)
    ]
    lines += [{"id": i, "prompt": f"Write a word about {i} apples."} for i in range(60, 80)]
    lines += [{"id": f"held-{i}", "messages": [{"role": "user", "content": f"What is {i} plus one?"}],
               "split": "eval"} for i in range(8)]  # fmt: skip
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


#: The two pipelines, by the test that reads each (distil also gets the user's prompts file).
PIPELINES: dict[str, tuple[str, ...]] = {
    "test_smoke_demo_runs_the_whole_pipeline": ("demo", "--recipe", "best"),
    "test_smoke_distil_of_a_users_prompts_without_references_or_checker": (
        *("distil", "--teacher", "tiny", "--recipe", "kd"),
    ),
}


@pytest.fixture(scope="module")
def pipelines(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Pipeline]]:
    """Both smoke pipelines at once (each uses about one core of a 2-core machine for ≈2 min; side by side they
    take ≈2.5 min instead of 4-5), only those whose tests were selected. Stopped with SIGTERM if a test ends first:
    a pipeline stops what it started."""
    selected = {item.name for item in request.session.items if item.path == request.path}
    started: dict[str, Pipeline] = {}
    try:
        for name, args in PIPELINES.items():
            if name in selected:
                base = tmp_path_factory.mktemp(name.removeprefix("test_smoke_")[:24])
                if args[0] == "distil":
                    args = (*args, "--prompts", str(_users_prompts(base / "mine.jsonl")))
                started[name] = _start(base, *args)
        yield started
    finally:
        for pipeline in started.values():
            if pipeline.proc.poll() is None:
                pipeline.proc.terminate()
                try:
                    pipeline.proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    pipeline.proc.kill()
                    pipeline.proc.wait()


def _served_and_swapped(summary: dict[str, Any], run_dir: Path) -> None:
    assert summary["failed_requests"] == 0
    # How many streams fall below 238 wpm while teacher, trainer and serving share two cores is the machine's speed,
    # not the code's (the full demo reports some as a matter of course); what is checked is that the report counts
    # them from the streams it measured, and that streams are served far above reading speed.
    full = json.loads((run_dir / "report.json").read_text())
    assert summary["streams"] > 0 and len(full["stream_wpm"]) > 0
    assert summary["streams_below_target"] == sum(1 for w in full["stream_wpm"] if w < READING_TARGET_WPM)
    assert summary["stream_wpm_p50"] > 2 * READING_TARGET_WPM
    # The smoke gate promotes every checkpoint: serving must have hot-swapped at least one student in.
    assert summary["promotions"] >= 1 and summary["swaps"] >= 1 and summary["served_versions"]
    assert 0 < summary["student_params"] < summary["teacher_params"] and summary["size_ratio"] > 1
    assert summary["student_tokens_per_s"] > 0 and summary["teacher_tokens_per_s"] > 0
    assert summary["student_streams_at_target"] >= 1
    assert full["history"] and full["evals"], "WatchRun progress and evaluations reach the report"
    assert [c for c in full["checkpoints"] if c["promoted"]]
    for name in ("report.md", "training.png", "wpm.png", "teacher_vs_student.png", "speed.json"):
        assert (run_dir / name).stat().st_size > 0, name
    # Everything the pipeline started has stopped: the broker's state file is removed only after its PID is gone.
    assert not (run_dir / "broker" / "broker.json").exists()
    assert (run_dir / "broker").is_dir(), "the pipeline ran its own broker in the run folder"


def test_smoke_demo_runs_the_whole_pipeline(pipelines: dict[str, Pipeline]) -> None:
    summary, run_dir = pipelines["test_smoke_demo_runs_the_whole_pipeline"].result()
    assert (summary["profile"], summary["recipe"], summary["metric"]) == ("smoke", "best", "accuracy")
    assert summary["checker"] == "numeric" and "fact-disjoint" in summary["held_out"]
    assert summary["teacher_samples"] >= summary["train_prompts"] > 0
    # The teacher was also asked in the phrasing the task declares; the student is compared with its better one.
    assert summary["prompt_variants"] == ["instructions"]
    assert set(summary["teacher_accuracy_by_variant"]) == {"", "instructions"}
    assert summary["teacher_score"] == summary["teacher_accuracy_best_prompt"]
    # best trains on verified teacher answers and teacher-scored references; the shares say how much of each. The
    # checker keeps only the tiny random teacher's rare right answers (a number that happens to match), so nearly
    # all signal is scored references, and none is on-policy (best has no on-policy share).
    share = summary["signal_share"]
    assert share["scored_reference"] > 0.5 and share["scored_student"] == 0
    assert sum(share.values()) == pytest.approx(1, 1e-3)
    _served_and_swapped(summary, run_dir)


def test_smoke_distil_of_a_users_prompts_without_references_or_checker(pipelines: dict[str, Pipeline]) -> None:
    summary, run_dir = pipelines["test_smoke_distil_of_a_users_prompts_without_references_or_checker"].result()
    assert (summary["metric"], summary["teacher_score"], summary["checker"]) == ("teacher_agreement", 1.0, None)
    assert summary["student_score"] is not None and summary["accuracy_ratio"] is None
    assert summary["use_case"] == "mine" and summary["dataset"]["eval_lines"] >= 8
    # Teacher signal only: no reference text, and the student's own answers came back scored by the teacher.
    share = summary["signal_share"]
    assert share["scored_reference"] == 0 and share["reference"] == 0
    assert share["generated"] > 0 and share["scored_student"] > 0
    assert summary["on_policy"]["requested"] > 0 and summary["on_policy"]["received"] > 0
    _served_and_swapped(summary, run_dir)


def test_distil_refuses_a_bad_file_before_starting_anything(tmp_path: Path) -> None:
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "messages": []}\n')
    env = {**os.environ, "DISTILLERY_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "distillery"), "distil", "--prompts", str(prompts), "--profile", "smoke",
         "--run-dir", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "bad.jsonl:2: messages: must be a non-empty list" in proc.stderr
    assert not (tmp_path / "run" / "broker").exists(), "nothing started"
