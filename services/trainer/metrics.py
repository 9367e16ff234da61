"""Trainer metrics (names are the contract with the dashboard and alerts; see the helper brief)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.trainer.buffer import SOURCES
from services.trainer.losses import COMPONENTS, ON_POLICY_COMPONENTS

TOKENS_TRAINED = Counter(
    "distillery_trainer_tokens_trained_total",
    "Target tokens trained on, by signal source: generated, scored_reference, scored_student (teacher samples) "
    "and reference (reference text alone).",
    ["source"],
)
TOKENS_PER_SECOND = Gauge("distillery_trainer_tokens_per_second", "Target tokens trained per second, whole steps.")
LOSS = Gauge("distillery_trainer_loss", "Last optimizer step's loss, total and by component.", ["component"])
STEP = Gauge("distillery_trainer_step", "Optimizer steps of the active run.")
CONSUMER_LAG = Gauge(
    "distillery_trainer_consumer_lag_records", "Teacher-sample records not yet read, from fetch high-water marks."
)
SAMPLES = Counter(
    "distillery_trainer_samples_total",
    "Teacher-sample records by outcome: trained, duplicate, filtered, dead_letter.",
    ["result"],
)
EVAL_ACCURACY = Gauge("distillery_trainer_eval_accuracy_ratio", "Student task accuracy on held-out prompts.")
EVAL_TEACHER_ACCURACY = Gauge(
    "distillery_trainer_eval_teacher_accuracy_ratio", "Teacher task accuracy on the same held-out prompts."
)
EVAL_KL = Gauge("distillery_trainer_eval_kl", "Mean KL(teacher top-k ‖ student) per held-out token.")
EVAL_TEACHER_BEST = Gauge(
    "distillery_trainer_eval_teacher_best_prompt_accuracy_ratio",
    "Teacher task accuracy on the held-out prompts in its best phrasing (the bar the student is compared with).",
)
EVAL_AGREEMENT = Gauge(
    "distillery_trainer_eval_teacher_agreement_ratio",
    "Held-out prompts where the student's greedy answer equals the teacher's (fidelity without a checker).",
)
GATE_SCORE = Gauge(
    "distillery_trainer_gate_score", "Last evaluation's value of the metric the run's gate reads.", ["metric"]
)
ON_POLICY = Counter(
    "distillery_trainer_on_policy_completions_total",
    "On-policy: student completions sent to be scored (requested), scored ones received, stale, stale_dropped.",
    ["result"],
)
EVAL_TOP1 = Gauge("distillery_trainer_eval_top1_agreement_ratio", "Held-out positions where top-1 tokens agree.")
EVAL_PERPLEXITY = Gauge("distillery_trainer_eval_perplexity", "Student perplexity on held-out teacher completions.")
CHECKPOINTS_WRITTEN = Counter("distillery_trainer_checkpoints_written_total", "Checkpoints written to the registry.")
CHECKPOINTS_PROMOTED = Counter("distillery_trainer_checkpoints_promoted_total", "Checkpoints promoted.")

for _c in ("total", *COMPONENTS, *ON_POLICY_COMPONENTS):
    LOSS.labels(_c)
for _r in ("trained", "duplicate", "filtered", "dead_letter"):
    SAMPLES.labels(_r)
for _s in SOURCES:
    TOKENS_TRAINED.labels(_s)
for _r in ("requested", "received", "stale", "stale_dropped"):
    ON_POLICY.labels(_r)

EVAL_GAUGES = {
    "accuracy": EVAL_ACCURACY,
    "teacher_accuracy": EVAL_TEACHER_ACCURACY,
    "teacher_accuracy_best_prompt": EVAL_TEACHER_BEST,
    "teacher_agreement": EVAL_AGREEMENT,
    "kl": EVAL_KL,
    "top1_agreement": EVAL_TOP1,
    "perplexity": EVAL_PERPLEXITY,
}
