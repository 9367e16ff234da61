"""Default recipes: the default student (pruned from the default teacher) and a complete default run spec.

`with_defaults(spec)` fills every field a caller left unset, so the rest of the trainer reads a complete spec.
The default student is Minitron-pruned from SmolLM2-135M (30 layers, hidden 576, 9/3 heads, MLP 1536, vocab
49152 tied): 6 layers chosen by block importance, hidden 256, 4 query / 2 key-value heads of size 64, MLP 768 —
17.3M parameters, 7.8× fewer than the teacher's 134.5M (the 49k × 256 input embedding is 12.6M of them). 4 layers
make the student's engine ≈30% faster, but held-out accuracy was lower in the demo runs that compared them (README,
"The student at 9.4×"), so the default keeps 6.
"""

from __future__ import annotations

from typing import Any

from services.common import pb

#: Held-out metrics a gate may read; kl (and perplexity) are better when lower.
GATE_METRICS = ("accuracy", "teacher_agreement", "top1_agreement", "kl")
LOWER_IS_BETTER = frozenset({"kl", "perplexity"})

#: The use-case label of a run that gives none (labels only filter samples; the checker is `spec.checker`).
DEFAULT_TASK = "default"

DEFAULT_STUDENT_RECIPE = pb.trainer.StudentRecipe(
    # A task-restricted head (services/common/outvocab.py): measured on the demo, see the README's "The student at
    # 9.4×" section for speed and held-out accuracy with and without it.
    output_vocab_coverage=0.99,
    pruned=pb.trainer.PrunedStudent(
        num_layers=6,
        layer_selection=pb.trainer.LAYER_SELECTION_IMPORTANCE,
        hidden_size=256,
        intermediate_size=768,
        num_attention_heads=4,
        num_key_value_heads=2,
        calibration_samples=64,
    ),
)

DEFAULT_LOSS = pb.trainer.LossSpec(
    forward_kl=1.0,
    reference_ce=1.0,
    jsd_beta=0.5,
    skew_alpha=0.1,
    temperature=1.0,
)

DEFAULT_SCHEDULE = pb.trainer.Schedule(
    learning_rate=1e-3,
    warmup_steps=20,
    max_steps=0,
    batch_size=16,
    grad_accum_steps=1,
    max_grad_norm=1.0,
    weight_decay=0.01,
    eval_every_steps=200,
    max_seq_len=256,
    bf16_autocast=True,
    replay_buffer_size=4096,
    sample_reuse=1,
    min_lr_ratio=0.1,
)

DEFAULT_DATA = pb.trainer.DataFilter(
    verify=pb.trainer.VERIFY_MODE_WEIGHT,
    incorrect_weight=0.25,
    drop_truncated=False,
)

DEFAULT_GATE = pb.trainer.GateSpec(min_accuracy_ratio=0.8, must_beat_promoted=True, min_accuracy=0.0)

DEFAULT_EVAL = pb.trainer.EvalSpec(
    max_prompts=64,
    max_new_tokens=48,
    max_agreement_samples=64,
    min_eval_samples=16,
)

#: Reverse KL on the student's own completions (MiniLLM; GKD with β = 1; the per-token reverse KL of on-policy
#: distillation recipes such as Tinker's): mode-seeking, so the student is pulled off what the teacher finds unlikely.
DEFAULT_ON_POLICY_LOSS = pb.trainer.LossSpec(reverse_kl=1.0, jsd_beta=0.5, skew_alpha=0.1, temperature=1.0)

DEFAULT_ON_POLICY = pb.trainer.OnPolicySpec(
    fraction=0.0,
    refresh_every_steps=20,
    prompts_per_refresh=64,
    max_new_tokens=64,
    temperature=1.0,
    max_staleness_steps=100,
    drop_stale=False,
)

DEFAULT_SEED = 0


def default_run_spec(
    task: str = DEFAULT_TASK,
    run_id: str = "",
    student: pb.trainer.StudentRecipe | None = None,
    max_steps: int | None = None,
) -> pb.trainer.RunSpec:
    """A complete run spec with every default filled in."""
    spec = pb.trainer.RunSpec(
        run_id=run_id,
        task=task,
        student=student if student is not None else DEFAULT_STUDENT_RECIPE,
        loss=DEFAULT_LOSS,
        schedule=DEFAULT_SCHEDULE,
        data=DEFAULT_DATA,
        gate=DEFAULT_GATE,
        eval=DEFAULT_EVAL,
        seed=DEFAULT_SEED,
        on_policy=DEFAULT_ON_POLICY,
    )
    spec.on_policy.loss.CopyFrom(DEFAULT_ON_POLICY_LOSS)
    if max_steps is not None:
        spec.schedule.max_steps = max_steps
    return spec


def _fill_optional(target: object, defaults: object) -> None:
    """Copies every `optional` field the caller left unset from `defaults` (explicit values, even 0, stay)."""
    for field in defaults.DESCRIPTOR.fields:  # type: ignore[attr-defined]
        if field.has_presence and not target.HasField(field.name) and defaults.HasField(field.name):  # type: ignore[attr-defined]
            setattr(target, field.name, getattr(defaults, field.name))


def describe_student(recipe: pb.trainer.StudentRecipe, head: bool = True) -> str:
    """A student recipe in words, for reports (`head`: with its output-vocabulary coverage)."""
    source = recipe.WhichOneof("source")
    vocab = (f", output vocabulary at {recipe.output_vocab_coverage:g} coverage"
             if head and recipe.output_vocab_coverage else "")  # fmt: skip
    if source == "pruned":
        p = recipe.pruned
        return (f"pruned from the teacher: {p.num_layers} layers, hidden {p.hidden_size}, MLP {p.intermediate_size}, "
                f"{p.num_attention_heads}/{p.num_key_value_heads} heads{vocab}")  # fmt: skip
    if source == "config":
        c = recipe.config
        return (f"a fresh model of the teacher's family: {c.num_layers} layers, hidden {c.hidden_size}, "
                f"MLP {c.intermediate_size}, {c.num_attention_heads}/{c.num_key_value_heads} heads{vocab}")  # fmt: skip
    return f"{source}{vocab}"


def student_for(teacher_config: dict[str, Any] | None) -> pb.trainer.StudentRecipe:
    """The default student of a teacher: `DEFAULT_STUDENT_RECIPE` for the default teacher's shape; for any other
    teacher the same proportions (a fifth of the layers by block importance, 0.44 of the width, heads and MLP;
    head size kept), so a user's own teacher gets a student it can be pruned into."""
    c = teacher_config or {}
    layers, hidden = int(c.get("num_hidden_layers", 0)), int(c.get("hidden_size", 0))
    heads, kv = (
        int(c.get("num_attention_heads", 0)),
        int(c.get("num_key_value_heads", 0) or c.get("num_attention_heads", 0)),
    )
    mlp = int(c.get("intermediate_size", 0))
    if not all((layers, hidden, heads, kv, mlp)) or (layers, hidden, heads, kv, mlp) == (30, 576, 9, 3, 1536):
        return DEFAULT_STUDENT_RECIPE
    width = 0.44
    kv_s = max(1, round(kv * width))
    heads_s = max(kv_s, round(heads * width) // kv_s * kv_s)
    heads_s = min(heads_s, kv_s * (heads // kv))  # no more query heads per key/value head than the teacher
    hidden_s = max(heads_s, round(hidden * width / heads_s) * heads_s)
    return pb.trainer.StudentRecipe(
        pruned=pb.trainer.PrunedStudent(
            num_layers=max(1, round(layers / 5)),
            layer_selection=pb.trainer.LAYER_SELECTION_IMPORTANCE,
            hidden_size=min(hidden, hidden_s),
            intermediate_size=max(1, min(mlp, round(mlp * width))),
            num_attention_heads=heads_s,
            num_key_value_heads=kv_s,
            calibration_samples=64,
        )
    )


def with_defaults(spec: pb.trainer.RunSpec, teacher_config: dict[str, Any] | None = None) -> pb.trainer.RunSpec:
    """A copy of `spec` with every unset field taken from the defaults (does not validate; see `spec.validate`).

    An unset student is the teacher's default student (`student_for`)."""
    out = pb.trainer.RunSpec()
    out.CopyFrom(spec)
    if not out.task:
        out.task = DEFAULT_TASK
    if out.student.WhichOneof("source") is None:
        # A recipe may give only its coverage: the default student with that head (0: the full vocabulary).
        given = out.student.HasField("output_vocab_coverage")
        coverage = out.student.output_vocab_coverage
        out.student.CopyFrom(student_for(teacher_config))
        if given:
            out.student.output_vocab_coverage = coverage
    weights = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "cross_entropy", "reference_ce")
    if not out.HasField("loss") or all(getattr(out.loss, w) == 0 for w in weights):
        for w in weights:
            setattr(out.loss, w, getattr(DEFAULT_LOSS, w))
    _fill_optional(out.loss, DEFAULT_LOSS)
    _fill_optional(out.schedule, DEFAULT_SCHEDULE)
    if out.data.verify == pb.trainer.VERIFY_MODE_UNSPECIFIED:
        out.data.verify = DEFAULT_DATA.verify
    _fill_optional(out.data, DEFAULT_DATA)
    _fill_optional(out.gate, DEFAULT_GATE)
    _fill_optional(out.eval, DEFAULT_EVAL)
    _fill_optional(out.on_policy, DEFAULT_ON_POLICY)
    if all(getattr(out.on_policy.loss, w) == 0 for w in weights):
        for w in weights:
            setattr(out.on_policy.loss, w, getattr(DEFAULT_ON_POLICY_LOSS, w))
    _fill_optional(out.on_policy.loss, DEFAULT_ON_POLICY_LOSS)
    if not out.HasField("seed"):
        out.seed = DEFAULT_SEED
    return out
