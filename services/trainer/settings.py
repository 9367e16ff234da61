"""Trainer settings: teacher (for the student recipe and tokenizer), compute threads, intake and run behaviour."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.models import DEFAULT_TEACHER
from services.common.settings import ServiceSettings, cpu_list

CONSUMER_GROUP_PREFIX = "distillery-trainer"


class TrainerSettings(ServiceSettings):
    """`distillery trainer serve` (env prefix `DISTILLERY_TRAINER_`, nested fields with `__`)."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_TRAINER_", env_nested_delimiter="__", extra="ignore")

    grpc_port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)
    teacher_model: str = DEFAULT_TEACHER
    """The teacher the students are made from (pruning, tokenizer, chat template): a prepared model name under the
    models folder (the default teacher is prepared on first use) or a Hugging Face-format folder."""
    torch_threads: int = Field(0, ge=0, le=1024)
    """Threads torch uses for training; 0 = every core this process may use."""
    cpu_bind: str = ""
    """Cores the trainer process is pinned to at start-up ("0", "2-3", "0,2"); empty: wherever the OS puts it. With
    `torch_threads` 0 the trainer then uses one thread per pinned core. Lets a trainer that shares a small machine
    with vLLM engines keep a core of its own (the demo does this on 2 cores)."""
    compile: bool = False
    """`torch.compile` the student's decoder for training steps (inductor, dynamic shapes): fewer, fused kernels
    after a one-off compile of a minute or two; needs a C++ compiler in the image. Evaluation stays eager."""
    group_prefix: str = CONSUMER_GROUP_PREFIX
    """Each run reads the samples topic from the start in its own consumer group `<prefix>.<run_id>`."""
    batch_wait_s: float = Field(2.0, ge=0, le=3600)
    """With fewer samples than a batch (fresh and replayable) and nothing new arriving, train a partial batch after
    this long."""
    poll_timeout_s: float = Field(0.2, gt=0, le=60)
    """Longest wait for new samples when the buffer has room and a batch can still be filled."""
    resume: bool = True
    """At start-up, resume the runs that were running or queued when the trainer stopped."""
    checkpoint_on_stop: bool = True
    """On StopRun and on SIGTERM, write a checkpoint of the current step before stopping."""
    lineage_log: Path | None = None
    """Optional audit trail: one JSON line per optimizer step (pid, run, step, and the partition/offset/kind/use
    of every item it trained), so what a checkpoint was trained on can be traced back to the samples topic."""
    announce_timeout_s: float = Field(30.0, gt=0, le=600)
    """Longest wait for the broker to acknowledge a checkpoint event (and a round of on-policy score requests)."""
    max_quarantined_batches: int = Field(10, ge=0, le=100_000)
    """A micro-batch whose forward or backward raises (or gives a non-finite loss) is quarantined: its records go to
    the dead-letter topic with the exception and the run goes on. Past this many in one run, the run fails with an
    error naming the last exception (something is wrong beyond a bad record)."""
    device: str = "auto"
    """Where the student trains and is evaluated: "auto" (CUDA when there is one, else CPU), "cpu", "cuda" or
    "cuda:N". On CUDA, steps run under bf16 autocast with pinned-memory batches, and the CPU-only settings
    (torch_threads, cpu_bind) are not applied."""
    checker_modules: list[str] = Field(default_factory=list)
    """Modules (with their submodules) a run's `python:MODULE:FUNCTION` checker may come from. Empty: no python
    checkers, so a StartRun caller cannot make the trainer import code; `distillery distil --checker python:…` sets
    it for the module it was given. Comma-separated in the environment is not supported: use JSON,
    `DISTILLERY_TRAINER_CHECKER_MODULES='["my_checks"]'`."""
    calibration_samples: int = Field(64, ge=1, le=100_000)
    """Training samples a pruned student is calibrated on when its recipe does not say (the first ones of the
    run's stream: the user's own prompts and the teacher's answers)."""

    world_size: int = Field(1, ge=1, le=256)
    """Data-parallel ranks per run (torch.distributed: gloo on CPU, NCCL on CUDA, one GPU per rank). 1: the run
    trains in this process. More: the service starts the run's ranks as child processes; rank 0 reads the samples
    topic and writes checkpoints and announcements, and every micro-batch (`spec.schedule.batch_size` items) is
    split over the ranks, so the run's arithmetic is the same for any world size."""
    rank_restarts: int = Field(3, ge=0, le=1000)
    """With world_size > 1: how often a run's ranks are restarted (all of them, from the newest checkpoint) after
    one of them died, before the run fails."""
    rank_timeout_s: float = Field(86_400.0, gt=0, le=30 * 86_400)
    """With world_size > 1: the collectives' timeout. The other ranks wait in one while rank 0 waits for samples
    or evaluates, so it is long; a dead rank is noticed by its exit (the launcher restarts the group), not by this."""

    run_memory_fraction: float = Field(0.8, gt=0, le=1)
    """A run whose estimated memory (student weights, gradients and Adam state in fp32, the teacher's weights when
    pruning, the batch's logits) exceeds this fraction of the machine's memory (or of the container's limit) is
    refused at StartRun with RESOURCE_EXHAUSTED, instead of getting the trainer killed."""

    @field_validator("cpu_bind")
    @classmethod
    def _cpu_list(cls, value: str) -> str:
        if value:
            cpu_list(value)
        return value

    @property
    def runs_dir(self) -> Path:
        """Where run specs and states are kept so a restarted trainer resumes the unfinished run."""
        return (self.home / "trainer" / "runs").resolve()

    @property
    def work_dir(self) -> Path:
        """Scratch space (initial students before their first checkpoint)."""
        return (self.home / "trainer" / "work").resolve()
