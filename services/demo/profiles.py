"""Demo profiles: how big each phase is. `smoke` runs on tiny models in ≈3 minutes (what `make test` runs end to
end); `default` distils the packaged teacher in ≤ 20 minutes on 2 CPU cores; `full` trains longer for the best student.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from services.common import pb


@dataclass(frozen=True)
class Profile:
    name: str
    #: "default" = the packaged SmolLM2-135M-Instruct; "tiny" = random tiny Llama built in code (smoke).
    teacher: str
    train_prompts: int
    eval_prompts: int
    difficulty: int
    #: Completions per training prompt (best-of-n: verified samples are kept).
    samples_per_prompt: int
    temperature: float
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
    #: Skip torch.compile in the vLLM engines (tiny models start much faster without it).
    enforce_eager: bool = False
    #: Skip torch.compile in the pipeline's serving engines only: each hot-swap starts an engine next to the one
    #: serving, on the same core as the trainer's neighbour; compiled engines are still what the speed phase measures.
    serving_enforce_eager: bool = False
    #: Which teacher samples train the student: keep-correct is best-of-n.
    verify: pb.trainer.VerifyMode.ValueType = pb.trainer.VERIFY_MODE_KEEP_CORRECT
    #: Training prompts whose reference solution the teacher scores instead of answering (teacher-forced samples: its
    #: top-k at every token of a correct answer). A prefill, not a generation: many more prompts per second.
    scored_prompts: int = 0
    #: Loss mix of the run (None: the trainer's default).
    loss: pb.trainer.LossSpec | None = None
    #: Torch threads of the trainer; 0: one per core it is pinned to (see `core_layout`: 1 on 2 cores).
    trainer_threads: int = 0
    #: Niceness of serving, which shares the trainer's core on 2 cores. At 5 the pinned trainer left serving too
    #: little while it still served the teacher: 18 of 650 streams fell below 238 wpm (p5 249). At 0 they share it.
    serving_nice: int = 0
    #: How long the trainer waits for a full batch before training a partial one (the teacher publishes in bursts).
    batch_wait_s: float = 30.0
    student: pb.trainer.StudentRecipe = field(default_factory=pb.trainer.StudentRecipe)
    #: Which checkpoints are promoted (and hot-swapped into serving).
    gate: pb.trainer.GateSpec = field(default_factory=pb.trainer.GateSpec)
    seed: int = 1
    #: Stop waiting for the run after this long (the report says so).
    time_budget_s: float = 1200.0


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
    train_prompts=48,
    eval_prompts=16,
    scored_prompts=32,
    difficulty=1,
    samples_per_prompt=2,
    temperature=1.0,
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
    # Random tiny models are never correct: keep every sample so the distillation losses run.
    verify=pb.trainer.VERIFY_MODE_KEEP_ALL,
    student=_pruned(1, 64, 128, 1, 1),
    # Random tiny models score 0: promote every checkpoint so the swap path runs end to end.
    gate=pb.trainer.GateSpec(min_accuracy_ratio=0.0, must_beat_promoted=False, min_accuracy=0.0),
    time_budget_s=150.0,
)

DEFAULT = Profile(
    name="default",
    teacher="default",
    # Best-of-2 answers from the teacher ...
    train_prompts=200,
    # 300 held-out problems: ±4 points at 95% confidence (150 gave ±6, and runs of one profile differed by more).
    eval_prompts=300,
    # ... and teacher-forced samples of worked solutions, which the teacher scores ≈10× faster than it answers.
    scored_prompts=6000,
    difficulty=1,
    samples_per_prompt=2,
    temperature=0.8,
    max_tokens=80,
    top_k=20,
    # The student learns the answer format in ~100 steps and the arithmetic only after ≈8,000–10,000 trained
    # samples, and small batches get there in less time. Measured offline on the worked solutions, 1 thread:
    # batch 32 reached 0.21 held-out accuracy after 300 steps (9,600 samples, 497 s) and 0.59 after 450; batch 16
    # 0.57 after 600 steps (9,600 samples, 527 s) and 0.95 after 900; batch 8 0.61 after 1,000 steps (477 s).
    max_steps=520,
    batch_size=16,
    eval_every_steps=130,
    learning_rate=1e-3,
    # The trainer takes samples ≈3× faster than the teacher scores them: each is trained on up to 5 times, fewest
    # uses first.
    sample_reuse=5,
    # A worked solution is ≈17 tokens ("8 + 4 = 12. The answer is 12." and the end of turn).
    eval_max_new_tokens=32,
    load_streams=3,
    load_max_tokens=48,
    load_think_s=3.0,
    load_temperature=0.0,
    speed_concurrency=16,
    max_capacity_streams=512,
    capacity_window_s=8.0,
    speed_budget_s=90.0,
    kv_cache_gib=1.0,
    serving_enforce_eager=True,
    student=_pruned(6, 256, 768, 4, 2),
    # KL to the teacher's top-k plus cross-entropy on the (verified or reference) tokens of every kept sample.
    loss=pb.trainer.LossSpec(forward_kl=1.0, cross_entropy=1.0, reference_ce=0.0, temperature=1.0),
    # Promote each checkpoint that beats the one served and reaches half of the teacher's accuracy.
    gate=pb.trainer.GateSpec(min_accuracy_ratio=0.5, must_beat_promoted=True, min_accuracy=0.0),
    time_budget_s=760.0,
)

FULL = replace(
    DEFAULT,
    name="full",
    train_prompts=2000,
    eval_prompts=300,
    scored_prompts=40000,
    samples_per_prompt=4,
    max_steps=6000,
    eval_every_steps=500,
    time_budget_s=4 * 3600.0,
)

PROFILES = {p.name: p for p in (SMOKE, DEFAULT, FULL)}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"profile={name!r} is not one of {sorted(PROFILES)}")
    return PROFILES[name]
