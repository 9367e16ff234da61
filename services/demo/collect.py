"""After the run: what the report says about it, read from the run's progress, the registry and the services' metrics.

The student's figures are the served checkpoint's (the newest promoted one, else the newest); the teacher's are the
trainer's measurement on the same held-out prompts, at its best phrasing.
"""

from __future__ import annotations

from pathlib import Path

from services.common.models import parameter_count
from services.common.process import ServiceProcess
from services.common.registry import Registry
from services.demo.report import DemoResult
from services.demo.scrape import scrape
from services.demo.watch import RunWatch

SAMPLES_PUBLISHED = "distillery_teacher_samples_published_total"


def collect(
    r: DemoResult,
    registry: Registry,
    procs: dict[str, ServiceProcess],
    watch: RunWatch,
    teacher_dir: Path,
    run_id: str,
) -> None:
    r.history, r.evals = watch.history, watch.evals
    r.teacher_params = parameter_count(teacher_dir)
    serving = scrape(procs["serving"].metrics_url)
    r.swaps = int(serving.get('distillery_serving_swaps_total{result="ok"}', 0))
    r.teacher_samples = int(scrape(procs["teacher"].metrics_url).get(SAMPLES_PUBLISHED, 0))
    progress = watch.progress
    if progress is not None:
        r.tokens_by_source = {k: int(v) for k, v in progress.tokens_by_source.items()}
        r.loss_by_source = dict(progress.loss_by_source)
        r.on_policy = {"requested": progress.on_policy_requested, "received": progress.on_policy_received,
                       "stale": progress.stale_samples, "stale_dropped": progress.stale_dropped}  # fmt: skip
    if r.evals:
        last = r.evals[-1]
        r.gate_metric = last.get("gate_metric") or ""
        r.teacher_accuracy = last.get("teacher_accuracy")
        r.teacher_accuracy_best_prompt = last.get("teacher_accuracy_best_prompt")
        r.teacher_accuracy_by_variant = last.get("teacher_accuracy_by_variant") or {}
    for ckpt in registry.checkpoints(run_id):
        promoted = registry.is_promoted(ckpt.version)
        r.promotions += int(promoted)
        r.checkpoints.append({"version": ckpt.version, "step": ckpt.manifest.step, "promoted": promoted,
                              **ckpt.manifest.metrics})  # fmt: skip
    served = registry.latest_promoted()
    chosen = served or registry.latest(run_id)
    if chosen is not None:
        m = chosen.manifest.metrics
        r.student_params = chosen.manifest.parameter_count
        r.student_accuracy = m.get("accuracy")
        r.student_agreement = m.get("teacher_agreement")
        r.student_kl = m.get("kl")
        r.student_top1 = m.get("top1_agreement")
        if "output_vocab_size" in m:
            r.output_vocab_size = int(m["output_vocab_size"])
            r.output_vocab_coverage = m.get("output_vocab_coverage")
            r.output_vocab_heldout_coverage = m.get("output_vocab_heldout_coverage")
        r.student_step = chosen.manifest.step
        if served is None:
            r.notes.append("student figures are from the last checkpoint (none was promoted)")
    r.served_versions = sorted({int(v) for v in r.served_versions} | set(registry.promoted_versions()))
