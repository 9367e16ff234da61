"""How big each phase of a distillation job is (profiles) and what the student learns from (recipes).

Profiles: `smoke` runs on tiny models in ≈3 minutes (what `make test` runs end to end); `default` distils the
packaged teacher in ≤ 20 minutes on 2 CPU cores; `full` trains longer for the best student.

Recipes (`--recipe`):
- `kd`: teacher signal only, the classic distillation setting. The teacher answers the training prompts (its own
  completions, unverified, with its top-k at every token) and, on-policy, scores the student's own completions; no
  reference answer is trained on and no checker filters anything.
- `best`: everything that helps: the teacher's best-of-n answers kept when the checker finds them correct, the
  prompts' reference answers scored by the teacher (its top-k over text it did not write), and on-policy samples.
  Without a checker or references it is `kd` with the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from services.common import pb


@dataclass(frozen=True)
class Recipe:
    name: str
    #: Train on the prompts' reference answers (scored by the teacher).
    references: bool
    #: Keep only the teacher's answers the checker finds correct (when there is a checker).
    verify_correct: bool
    #: The teacher's answers to training prompts: completions per prompt and temperature (0 = greedy, n = 1).
    samples_per_prompt: int
    temperature: float
    #: Loss on every sample but the on-policy ones (those take `OnPolicySpec.loss`, reverse KL).
    loss: pb.trainer.LossSpec
    #: Fraction of each batch from the student's own completions scored by the teacher (GKD's λ; 0 = off-policy).
    on_policy_fraction: float
    description: str


RECIPES = {
    r.name: r
    for r in (
        Recipe(
            name="kd",
            references=False,
            verify_correct=False,
            # The teacher's greedy answer is what its accuracy is measured on: a student that reproduces the
            # teacher's greedy path (sequence-level KD, Kim & Rush 2016) reproduces its answers.
            samples_per_prompt=1,
            temperature=0.0,
            loss=pb.trainer.LossSpec(forward_kl=1.0, cross_entropy=1.0, reference_ce=0.0, temperature=1.0),
            on_policy_fraction=0.25,
            description="teacher signal only: the teacher's answers (unverified) and on-policy scored student samples",
        ),
        Recipe(
            name="best",
            references=True,
            verify_correct=True,
            samples_per_prompt=2,
            temperature=0.8,
            loss=pb.trainer.LossSpec(forward_kl=1.0, cross_entropy=1.0, reference_ce=0.0, temperature=1.0),
            on_policy_fraction=0.0,
            description="everything: verified best-of-n teacher answers and teacher-scored reference answers",
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"recipe={name!r} is not one of {', '.join(RECIPES)}")
    return RECIPES[name]


@dataclass(frozen=True)
class Profile:
    name: str
    #: The teacher when the job names none: "default" (the packaged SmolLM2-135M-Instruct) or "tiny".
    teacher: str
    #: Most training prompts the teacher answers (recipe `kd`, or `best` without references); with references,
    #: `best` has it answer `best_generated` of them (best-of-n, verified) and score up to `score_prompts` references.
    generate_prompts: int
    score_prompts: int
    best_generated: int
    #: Most held-out prompts (the teacher answers each greedily, in every phrasing; the student is judged on them).
    eval_prompts: int
    max_tokens: int
    top_k: int
    max_steps: int
    batch_size: int
    eval_every_steps: int
    learning_rate: float
    #: Times each teacher sample is trained on (the teacher generates far slower than the student trains).
    sample_reuse: int
    eval_max_new_tokens: int
    #: Concurrent client streams kept on serving while the student trains and swaps.
    load_streams: int
    load_max_tokens: int
    #: Pause of each simulated client between streams, so the load is users reading, not a stress test.
    load_think_s: float
    #: Greedy answers (as the task is scored) by default; random tiny models need sampling to produce words.
    load_temperature: float
    #: Concurrency at which teacher and student tokens/s are compared; bound of the streams-at-target search.
    speed_concurrency: int
    max_capacity_streams: int
    capacity_window_s: float
    #: Time for both capacity searches together (engine starts excluded).
    speed_budget_s: float
    kv_cache_gib: float
    #: Seconds of the probe at the equal concurrency whose steady state gives the tokens/s compared
    #: (`ServingBenchConfig.equal_probe_s`; None: a capacity probe's).
    speed_window_s: float | None = None
    #: Skip torch.compile in the vLLM engines (tiny models start much faster without it).
    enforce_eager: bool = False
    #: Skip torch.compile in the pipeline's serving engines only: each hot-swap starts an engine next to the one
    #: serving, on the same core as the trainer's neighbour; compiled engines are still what the speed phase measures.
    serving_enforce_eager: bool = False
    #: Torch threads of the trainer; 0: one per core it is pinned to (see `core_layout`: 1 on 2 cores).
    trainer_threads: int = 0
    #: Niceness of the trainer, which shares serving's core on 2 cores. Measured on a 2-core AVX2 machine, where
    #: serving the teacher (until the first promotion) to two readers keeps its engine ≈85% busy: at 0 (an equal
    #: share) 239 of 276 client streams fell below 238 wpm (p50 159); at 10 the trainer got ≈9% of the core and
    #: had not reached its first evaluation after 600 s. Neither fits on that machine; 0 keeps the distillation.
    trainer_nice: int = 0
    #: How long the trainer waits for a full batch before training a partial one (the teacher publishes in bursts).
    batch_wait_s: float = 30.0
    #: None: the trainer's default student for the teacher (services/trainer/recipes.py `student_for`).
    student: pb.trainer.StudentRecipe | None = None
    #: Which checkpoints are promoted (and hot-swapped into serving); the metric follows the checker.
    gate: pb.trainer.GateSpec = field(default_factory=pb.trainer.GateSpec)
    #: On-policy rounds (the fraction comes from the recipe).
    on_policy: pb.trainer.OnPolicySpec = field(default_factory=pb.trainer.OnPolicySpec)
    #: Training prompts published ahead of the teacher: a short backlog keeps on-policy score requests (which queue
    #: behind it on the prompts topic) fresh, and stops costing the teacher anything once the run ends.
    feed_backlog: int = 256
    #: Training prompts sent before the held-out ones, so the trainer has work while the teacher answers those.
    feed_head: int = 256
    seed: int = 1
    #: Stop waiting for the run after this long (the report says so).
    time_budget_s: float = 1200.0
    #: Count `time_budget_s` from the first training step instead of from the run's start, so the budget is training
    #: time (calibration, pruning and the teacher's first answers excluded); `distillery bench onpolicy` uses it.
    budget_from_first_step: bool = False


def _pruned(layers: int, hidden: int, mlp: int, heads: int, kv_heads: int) -> pb.trainer.StudentRecipe:
    return pb.trainer.StudentRecipe(
        pruned=pb.trainer.PrunedStudent(
            num_layers=layers,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            layer_selection=pb.trainer.LAYER_SELECTION_EVENLY,
            calibration_samples=32,
        )
    )


SMOKE = Profile(
    name="smoke",
    teacher="tiny",
    generate_prompts=48,
    # best: 64 references × sample_reuse 4 = 32 steps of 8, enough for max_steps even when the checker keeps none
    # of the tiny random teacher's answers (with 32 the run starved at step 16 and waited for the time budget).
    score_prompts=64,
    best_generated=16,
    eval_prompts=16,
    max_tokens=12,
    top_k=8,
    max_steps=24,
    batch_size=8,
    eval_every_steps=8,
    learning_rate=1e-3,
    sample_reuse=4,
    eval_max_new_tokens=12,
    load_streams=2,
    load_max_tokens=12,
    load_think_s=1.0,
    load_temperature=1.0,
    speed_concurrency=2,
    max_capacity_streams=4,
    capacity_window_s=3.0,
    speed_budget_s=20.0,
    kv_cache_gib=0.25,
    enforce_eager=True,
    serving_enforce_eager=True,
    batch_wait_s=2.0,
    student=_pruned(1, 64, 128, 1, 1),
    # Random tiny models score 0: promote every checkpoint so the swap path runs end to end.
    gate=pb.trainer.GateSpec(min_accuracy_ratio=0.0, must_beat_promoted=False, min_accuracy=0.0, min_score=0.0),
    on_policy=pb.trainer.OnPolicySpec(refresh_every_steps=4, prompts_per_refresh=8, max_new_tokens=12),
    feed_backlog=64,
    feed_head=16,
    time_budget_s=150.0,
)

DEFAULT = Profile(
    name="default",
    teacher="default",
    generate_prompts=6000,
    # Teacher-forced samples of references: a prefill each (recipe best). Prompts are sent just ahead of the teacher,
    # so what the run has no time for is never sent.
    score_prompts=6000,
    best_generated=64,
    # 200 held-out prompts (±5–6 points at 95% confidence), each answered by the teacher in every phrasing.
    eval_prompts=200,
    max_tokens=80,
    top_k=20,
    # Sized for a 2-core AVX2 machine, where a step of 8 takes ≈1 s on a core of its own and learning arithmetic
    # the student never saw takes hundreds of steps (measured offline on the worked solutions, cross-entropy only,
    # fact-disjoint held-out accuracy: 0.10 after 200 steps, 0.16 after 400, batch 8; batch 16 reached 0.135 after
    # 200 steps of twice the time). Faster machines reach max_steps before the time budget.
    max_steps=400,
    batch_size=8,
    eval_every_steps=100,
    learning_rate=1e-3,
    sample_reuse=5,
    # A worked solution is ≈17 tokens ("8 + 4 = 12. The answer is 12." and the end of turn).
    eval_max_new_tokens=32,
    # Two readers, each reading an answer before asking again (48 tokens ≈ 36 words ≈ 9 s at 238 words a minute);
    # on 2 cores serving shares the trainer's core (see core_layout).
    load_streams=2,
    load_max_tokens=48,
    load_think_s=8.0,
    load_temperature=0.0,
    speed_concurrency=16,
    max_capacity_streams=512,
    capacity_window_s=6.0,
    speed_budget_s=60.0,
    # At the teacher's capacity one of its 48-token streams lasts ≈8 s: several of them back to back.
    speed_window_s=40.0,
    kv_cache_gib=1.0,
    serving_enforce_eager=True,
    # Promote each checkpoint that beats the one served and reaches half of the teacher's score.
    gate=pb.trainer.GateSpec(min_accuracy_ratio=0.5, must_beat_promoted=True, min_accuracy=0.0),
    # On-policy rounds (recipe kd): 16 completions every 20 steps feed a quarter of each batch of 8 (each used up to
    # sample_reuse times); sampling them costs the trainer a few seconds a round.
    on_policy=pb.trainer.OnPolicySpec(refresh_every_steps=20, prompts_per_refresh=16, max_new_tokens=40),
    # 160 training prompts (800 items at sample_reuse 5: 100 steps, about what the trainer does while the teacher
    # answers the 400 held-out generations), then the held-out prompts, then the rest once those are answered.
    feed_head=160,
    time_budget_s=600.0,
)

FULL = replace(
    DEFAULT,
    name="full",
    generate_prompts=40000,
    score_prompts=40000,
    best_generated=2000,
    eval_prompts=300,
    max_steps=6000,
    eval_every_steps=500,
    speed_budget_s=90.0,
    time_budget_s=4 * 3600.0,
)

PROFILES = {p.name: p for p in (SMOKE, DEFAULT, FULL)}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"profile={name!r} is not one of {sorted(PROFILES)}")
    return PROFILES[name]
