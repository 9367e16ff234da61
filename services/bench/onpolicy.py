"""`distillery bench onpolicy`: our on-policy loop beside TRL's `DistillationTrainer`, equal training wall time.

One run, one machine, the phases one after another with the machine to themselves:
1. ours: the real pipeline of `distillery demo --recipe kd` (embedded broker, vLLM teacher, trainer and serving as
   processes, prompts fed through Kafka, on-policy rounds scored by the teacher service) on the demo's profile with
   `max_steps` and evaluation intervals out of reach, the time budget counted from the first training step
   (`Profile.budget_from_first_step`), no client load and no speed phase (serving speed is not compared). The
   trainer evaluates its last checkpoint on the held-out split when it is stopped.
2. TRL: `DistillationTrainer` (services/bench/onpolicy_trl.py) on the same initial student (the trainer's own
   `student-init` folder of that run: the same pruned student, calibrated on the run's first samples), the same
   teacher folder, the same training prompts (the run's training split, the same chats), for the same wall time.
3. Its student is judged by our evaluator (services/trainer/evaluate.py) on our run's held-out set: the `EvalSet` the
   trainer persisted in the checkpoint it evaluated last (the same held-out prompts and token ids, the same teacher
   answers in every phrasing, the same checker), so both sides' figures come from one set and one code path.

Tokens/s on both sides: completion tokens trained per second of training wall time, i.e. positions of a completion
the loss was computed at, counted each time they are trained. Ours: `RunProgress.tokens_trained` (teacher answers,
reused up to `sample_reuse` times, and scored student completions) over the time from the first step the pipeline saw
to its StopRun. TRL's: the `completion_mask` of every batch it trained (its own sampled completions, each once) over
the time from `on_train_begin` to the end of the step in flight at the deadline; its generation and teacher forward
are inside that time, as ours runs its on-policy sampling inside its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from services.common import pb
from services.common.registry import Checkpoint
from services.demo.job import Job
from services.demo.pipeline import DemoFailed, Pipeline
from services.demo.profiles import Profile
from services.demo.watch import RunWatch

Log = Callable[[str], None]
#: Steps and evaluation interval out of reach: the wall clock ends ours, not the step count (and the cosine learning
#: rate schedule over them stays at its peak, as TRL's constant one does).
MAX_STEPS = 1_000_000
#: Held-out figures compared, as `EvalResult.metrics()` names them (kl and perplexity: lower is better).
HELD_OUT = ("accuracy", "teacher_agreement", "kl", "top1_agreement", "perplexity")
TOKENS_COUNTED = (
    "completion tokens trained per second of training wall time (positions the loss was computed at, each use "
    "counted): ours RunProgress.tokens_trained from the first step the pipeline saw to its StopRun; TRL the "
    "completion_mask of every trained batch from on_train_begin to the end of the step in flight at its deadline"
)


@dataclass
class OnPolicyBenchConfig:
    #: The demo profile the run starts from: "default" (the packaged teacher) or "smoke" (tiny random models).
    profile: str = "default"
    #: Training wall time of each side, seconds.
    wall_s: float = 600.0
    #: Our share of each batch from the student's own scored completions (None: the kd recipe's, 0.25).
    on_policy_fraction: float | None = None


def bench_profile(base: Profile, wall_s: float) -> Profile:
    """The demo profile as the bench runs it: stopped by the wall clock counted from the first training step,
    evaluated once (at the stop), no client load on serving."""
    if wall_s <= 0:
        raise ValueError(f"wall_s={wall_s}: must be > 0")
    return replace(base, max_steps=MAX_STEPS, eval_every_steps=MAX_STEPS, time_budget_s=wall_s,
                   budget_from_first_step=True, load_streams=0)  # fmt: skip


def student_override(base: Profile) -> str | None:
    """`--student` for the run: the teacher's default student with the full vocabulary when the profile takes the
    default (TRL's loss reads `lm_head.weight` over the whole vocabulary; a restricted head has none); else the
    profile's own student, which must not restrict the head either."""
    if base.student is None:
        return '{"output_vocab_coverage": 0}'
    if base.student.output_vocab_coverage > 0:
        raise ValueError(f"profile {base.name}: a restricted output vocabulary cannot be trained by TRL")
    return None


def ratio(ours: float | None, trl: float | None) -> float | None:
    """ours ÷ TRL, or None when either is missing or TRL's is 0."""
    if ours is None or trl is None or trl == 0:
        return None
    return round(ours / trl, 3)


def side(held_out: dict[str, float], steps: int, tokens: int, seconds: float) -> dict[str, Any]:
    """One side's figures: held-out metrics (None where not measured), steps, tokens and tokens/s."""
    return {
        "held_out": {name: (round(held_out[name], 4) if name in held_out else None) for name in HELD_OUT},
        "steps": steps,
        "completion_tokens": tokens,
        "train_seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
    }


def ratios(ours: dict[str, Any], trl: dict[str, Any]) -> dict[str, float | None]:
    """ours ÷ TRL for tokens/s, steps and every held-out metric (for kl and perplexity below 1 favours ours)."""
    out = {name: ratio(ours[name], trl[name]) for name in ("tokens_per_s", "steps")}
    for name in HELD_OUT:
        out[name] = ratio(ours["held_out"][name], trl["held_out"][name])
    return out


class BenchPipeline(Pipeline):
    """The demo pipeline without its parts this bench does not compare: no wait for serving to swap in the last
    promotion, no teacher-vs-student speed phase. Keeps what the TRL side needs (teacher folder, the run's watch)."""

    teacher_path: Path
    watch: RunWatch

    def teacher_dir(self) -> Path:
        self.teacher_path = super().teacher_dir()
        return self.teacher_path

    def wait_for_last_promotion(self, address: str, timeout_s: float = 120.0) -> None:
        pass  # serving is not compared here

    def collect(self, procs: Any, watch: RunWatch, teacher_dir: Path) -> None:
        super().collect(procs, watch, teacher_dir)
        self.watch = watch

    def measure_speed(self, teacher_dir: Path) -> None:
        self.result.notes.append("speed through serving not measured: `distillery bench onpolicy` compares training")

    @property
    def train_seconds(self) -> float:
        if self.first_step_at is None:
            raise DemoFailed("ours never trained a step: no teacher answers reached the trainer (see the logs)")
        return (self.stopped_at or time.monotonic()) - self.first_step_at

    def student_init(self) -> Path:
        """The initial student the trainer made for this run (pruned and calibrated, before any step)."""
        folder = self.run_dir / "trainer" / "work" / self.run_id / "student-init"
        if not (folder / "config.json").is_file():
            raise DemoFailed(f"{folder}: the run's initial student is missing")
        return folder


def make_job(config: OnPolicyBenchConfig, folder: Path) -> Job:
    """The demo's job (the built-in use case exported into the run folder), recipe kd, on the bench's profile."""
    from services.demo.job import load_job
    from services.demo.profiles import get_profile, get_recipe
    from services.tasks.builtin import DEFAULT_TASK, get_builtin
    from services.tasks.dataset import write_examples

    base = get_profile(config.profile)
    profile = bench_profile(base, config.wall_s)
    task = get_builtin(DEFAULT_TASK)
    path = folder / f"{task.name}.jsonl"
    write_examples(path, task.generate(max(base.generate_prompts, base.best_generated + base.score_prompts),
                                       base.eval_prompts, base.seed))  # fmt: skip
    return load_job(path, profile=profile, recipe=get_recipe("kd"), checker=task.checker, held_out=task.held_out,
                    name=task.name, on_policy_fraction=config.on_policy_fraction,
                    student=student_override(base))  # fmt: skip


def held_out_set(ckpt: Checkpoint) -> tuple[Any, pb.trainer.RunSpec]:
    """The held-out set a checkpoint was evaluated on (persisted in its trainer state) and the run's spec."""
    from services.tasks import parse_checker
    from services.trainer.checkpoint import load_resume_point
    from services.trainer.evalset import EvalSet
    from services.trainer.spec import from_json

    spec = from_json(ckpt.manifest.run_spec)
    checker = parse_checker(spec.checker) if spec.checker else None
    evalset = EvalSet(spec.eval.max_prompts, spec.eval.max_agreement_samples, checker)
    evalset.load_state(load_resume_point(ckpt).state["eval"])
    return evalset, spec


def run_bench(config: OnPolicyBenchConfig, folder: Path, console: Console, log: Log) -> dict[str, Any]:
    import torch

    from services.bench.onpolicy_trl import FIXED, TrlSettings, train_trl
    from services.bench.trl_args import cpu_peer_args
    from services.common.models import load_tokenizer, offline, parameter_count
    from services.common.settings import distillery_home
    from services.trainer.device import bf16_is_fast
    from services.trainer.evaluate import evaluate

    offline()
    folder.mkdir(parents=True, exist_ok=True)
    job = make_job(config, folder)
    log(f"ours: distillery demo --recipe kd on profile {job.profile.name}, {config.wall_s:.0f} s of training")
    pipeline = BenchPipeline(job, distillery_home(), folder, console, price_per_hour=0.10)
    summary = pipeline.run()
    ckpt = pipeline.registry.latest(pipeline.run_id)
    if ckpt is None:
        raise DemoFailed("ours wrote no checkpoint")
    evalset, spec = held_out_set(ckpt)
    progress = pipeline.watch.progress
    assert progress is not None
    ours = side(ckpt.manifest.metrics, int(progress.step), int(progress.tokens_trained), pipeline.train_seconds)

    student_dir, teacher_dir = pipeline.student_init(), pipeline.teacher_path
    train = job.train[: pipeline.plan.generated_prompts]
    prompts = [e.content.chat() if e.content.messages else e.content.prompt for e in train]
    s = spec.schedule
    settings = TrlSettings(wall_s=config.wall_s, batch_size=s.batch_size, learning_rate=s.learning_rate,
                           warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
                           max_completion_length=spec.on_policy.max_new_tokens,
                           temperature=spec.on_policy.temperature, seed=spec.seed)  # fmt: skip
    threads = len(os.sched_getaffinity(0))
    trl_started = time.monotonic()
    trl_run = train_trl(settings, student_dir, teacher_dir, prompts, threads, log)
    log(f"TRL: {trl_run.steps} steps in {trl_run.seconds:.0f} s; evaluating its student on our held-out set")
    device = torch.device("cpu")
    autocast = s.bf16_autocast and bf16_is_fast(device)
    notes = list(summary["notes"])
    if evalset.ready(spec.eval.min_eval_samples):
        result = evaluate(trl_run.model, load_tokenizer(student_dir), evalset, spec, device, autocast)
        trl_metrics = result.metrics()
    else:  # ours was not evaluated either: no held-out figures on a partial set
        trl_metrics = {}
        notes.append("the teacher had not answered the whole held-out set when ours stopped: neither side evaluated "
                     "(raise --wall-s)")  # fmt: skip
    trl = side(trl_metrics, trl_run.steps, trl_run.completion_tokens, trl_run.seconds)
    trl["phase_wall_s"] = round(time.monotonic() - trl_started, 1)  # loading, training and our evaluation
    ours_extra = {
        "tokens_by_source": dict(progress.tokens_by_source),
        "signal_share": summary["signal_share"],
        "on_policy_fraction": round(spec.on_policy.fraction, 6),
        "on_policy": summary["on_policy"],
        "teacher_samples": summary["teacher_samples"],
        "pipeline_wall_s": summary["wall_s"],  # the whole demo run: broker, engines, calibration, training, eval
        "run_dir": str(folder),
    }
    peer = cpu_peer_args(spec.seed, logging_steps=0)
    trl_settings = {**_rounded(asdict(settings)), **FIXED, "gradient_checkpointing": peer["gradient_checkpointing"],
                    "bf16": peer["bf16"], "threads": threads}  # fmt: skip
    held_out = {
        "prompts": len(evalset.student_prompts()),
        "agreement_samples": len(evalset.samples),
        "teacher_accuracy": evalset.teacher_accuracy(),
        "teacher_accuracy_best_prompt": evalset.teacher_accuracy_best_prompt(),
        "set": f"the EvalSet persisted in ours' last checkpoint (version {ckpt.version}, step {ckpt.manifest.step}): "
        f"{summary['held_out']}; checker {spec.checker or 'none'}",
    }
    return {
        "ours": {**ours, **ours_extra},
        "trl": {**trl, "settings": trl_settings},
        "ratios": ratios(ours, trl),
        "held_out": held_out,
        "tokens_counted": TOKENS_COUNTED,
        "student": {
            "parameters": parameter_count(student_dir),
            "recipe": summary.get("student_recipe") or "",
            "initial": "the trainer's student-init folder of ours' run, for both",
        },
        "teacher": summary.get("teacher_model") or "",
        "peers": peers(spec, job.profile.top_k, threads),
        "wall_s": config.wall_s,
        "config": asdict(config),
        "notes": notes,
    }


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Floats read from the protobuf spec (float32) as the decimals they were set to."""
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in values.items()}


def peers(spec: pb.trainer.RunSpec, top_k: int, threads: int) -> dict[str, str]:
    """Every design difference between the two sides, said plainly."""
    from services.demo.pipeline import core_layout

    op = spec.on_policy
    cores = core_layout(sorted(os.sched_getaffinity(0)))
    return {
        "ours": (
            f"the kd recipe through the real pipeline: the vLLM teacher in its own process on its own core answers "
            f"the training prompts concurrently (greedy, top-{top_k} log-probs) and scores the "
            f"student's completions; {op.fraction:g} of each batch of {spec.schedule.batch_size} is the student's "
            f"own completions (reverse KL over the teacher's top-k + tail), the rest teacher answers (forward KL + "
            f"cross-entropy), each reused up to {spec.schedule.sample_reuse} times; the student samples "
            f"{op.prompts_per_refresh} completions every {op.refresh_every_steps} steps (transformers, in the "
            f"trainer); CPU cores as the demo pins them: teacher {cores['teacher']}, trainer "
            f"{cores['trainer'] or 'unpinned'}, serving {cores['serving']} (idle: no client load)"
        ),
        "trl": (
            f"TRL 1.16 DistillationTrainer: fully on-policy (no off-policy share: every batch is "
            f"{spec.schedule.batch_size} fresh student completions), sampled with transformers generate in the "
            "training process (its vLLM colocate mode fails on this CPU build), the teacher a transformers model in "
            "the same process run every step, reverse KL (beta 1) over the full vocabulary; one process on "
            f"{threads} threads, nothing concurrent"
        ),
        "same": "initial student (our run's student-init), teacher folder, training prompts and chat template, "
        "learning rate, warm-up, AdamW betas, weight decay, clipping, batch size, training wall time, held-out set, "
        "evaluator and checker",
    }
