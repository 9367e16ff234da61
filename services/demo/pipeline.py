"""One distillation job end to end, phase by phase, with a report: `distillery distil` (and `distillery demo`, which
is the same job on a built-in use case).

    broker → teacher model → teacher, trainer, serving processes → distillation run: prompts fed just ahead of the
    teacher (a first share of the training prompts, the held-out ones in every phrasing, the rest), client load on
    serving (hot-swaps as students are promoted) → teacher vs student speed through serving → report

Everything the pipeline starts (broker, three service processes) is stopped at the end, on Ctrl-C, SIGTERM and on
failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.common import broker, channels, pb
from services.common.models import DEFAULT_TEACHER, prepare_default_teacher
from services.common.process import ProcessGroup, ServiceFailed, ServiceProcess, install_sigterm_as_interrupt
from services.common.registry import Registry
from services.common.settings import KafkaSettings
from services.demo.feeder import Feeder
from services.demo.job import Job
from services.demo.plan import Plan, make_plan
from services.demo.report import DemoResult, write_report
from services.demo.scrape import scrape
from services.demo.watch import RunWatch, watch_run

#: The teacher's prompts-topic lag (services/teacher/metrics.py), read from its /metrics.
PROMPT_LAG = "distillery_teacher_prompt_lag_records"
#: Prompt records the teacher finished: answered, or dead-lettered (so a bad prompt never holds the feed back).
PROMPTS_CONSUMED = "distillery_teacher_prompts_consumed_total"


class DemoFailed(RuntimeError):
    pass


class Pipeline:
    """One job in `run_dir`; `run()` returns the summary dict."""

    def __init__(self, job: Job, home: Path, run_dir: Path, console: Console, price_per_hour: float) -> None:
        self.job = job
        self.profile = job.profile
        self.home = home
        self.run_dir = run_dir
        self.console = console
        self.group = ProcessGroup()
        self.result = DemoResult(profile=job.profile.name, teacher_model="", machine_price_per_hour=price_per_hour,
                                 recipe=job.recipe.name, use_case=job.name, checker=job.checker,
                                 held_out=job.held_out)  # fmt: skip
        self.registry = Registry(run_dir / "registry")
        self.plan: Plan = make_plan(job)
        #: When the pipeline first saw a trained step, and when it asked the trainer to stop (time.monotonic()).
        self.first_step_at: float | None = None
        self.stopped_at: float | None = None
        self._started_broker = False
        self._t0 = time.monotonic()

    # -- phases ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, message: str) -> Iterator[None]:
        start = time.monotonic()
        with self.console.status(f"[bold]{message}[/bold]"):
            yield
        self.result.phases[name] = time.monotonic() - start
        self.console.log(f"{message} — done in {self.result.phases[name]:.1f}s")

    def kafka_bootstrap(self) -> str:
        external = os.environ.get("DISTILLERY_KAFKA_BOOTSTRAP")
        if external:
            self.result.notes.append("used the Kafka cluster in DISTILLERY_KAFKA_BOOTSTRAP (no embedded broker)")
            return external
        state = broker.start(self.run_dir, die_with_caller=True)
        self._started_broker = True
        return state.bootstrap

    def teacher_dir(self) -> Path:
        if self.job.teacher == "default":
            self.result.teacher_model = DEFAULT_TEACHER
            return prepare_default_teacher(self.home / "models")
        if self.job.teacher == "tiny":
            from services.common.tiny import build_llama

            self.result.teacher_model = "tiny random Llama (smoke runs)"
            return build_llama(self.run_dir / "tiny-teacher", hidden_size=128, num_layers=2, num_heads=2,
                               num_kv_heads=1)  # fmt: skip
        self.result.teacher_model = str(Path(self.job.teacher).resolve())
        return Path(self.job.teacher).resolve()

    def start_services(self, bootstrap: str, teacher_dir: Path) -> dict[str, ServiceProcess]:
        p = self.profile
        # vLLM's automatic binding pins every engine to the same core (core 0 on a 2-core machine): the teacher was
        # measured taking over 2 minutes for a batch that takes 2.2 s alone. The services get cores of their own
        # instead (see `core_layout`).
        cores = core_layout(sorted(os.sched_getaffinity(0)))
        common = {
            "DISTILLERY_HOME": str(self.home),
            "DISTILLERY_KAFKA_BOOTSTRAP": bootstrap,
            # One partition: one teacher replica, and the trainer then reads samples in the order they were published
            # (with two, kafka-python's fetcher fed the trainer from one partition far more than the other).
            "DISTILLERY_KAFKA_PARTITIONS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_HOST_IP": "127.0.0.1",
        }
        trainer: dict[str, str] = {
            "DISTILLERY_TRAINER_TEACHER_MODEL": str(teacher_dir),
            "DISTILLERY_TRAINER_TORCH_THREADS": str(p.trainer_threads),
            "DISTILLERY_TRAINER_BATCH_WAIT_S": str(p.batch_wait_s),
            "DISTILLERY_TRAINER_CPU_BIND": cores["trainer"],
            # The run's python: checker, and only it, may be imported by the trainer.
            "DISTILLERY_TRAINER_CHECKER_MODULES": json.dumps(self.job.checker_modules),
        }
        if self.job.python_path:
            trainer["PYTHONPATH"] = os.pathsep.join([*self.job.python_path, os.environ.get("PYTHONPATH", "")])
        env: dict[str, dict[str, str]] = {
            "teacher": {
                "DISTILLERY_TEACHER_MODEL": str(teacher_dir),
                "DISTILLERY_TEACHER_VLLM__ENFORCE_EAGER": str(p.enforce_eager).lower(),
                "DISTILLERY_TEACHER_VLLM__KV_CACHE_GIB": str(p.kv_cache_gib),
                "DISTILLERY_TEACHER_VLLM__MAX_MODEL_LEN": "1024",
                "DISTILLERY_TEACHER_MAX_N": str(max(self.job.recipe.samples_per_prompt, 1)),
                "DISTILLERY_TEACHER_VLLM__CPU_BIND": cores["teacher"],
            },
            "trainer": trainer,
            "serving": {
                "DISTILLERY_SERVING_INITIAL_MODEL": str(teacher_dir),
                "DISTILLERY_SERVING_VLLM__ENFORCE_EAGER": str(p.enforce_eager or p.serving_enforce_eager).lower(),
                "DISTILLERY_SERVING_VLLM__KV_CACHE_GIB": str(p.kv_cache_gib),
                "DISTILLERY_SERVING_VLLM__MAX_MODEL_LEN": "1024",
                "DISTILLERY_SERVING_VLLM__CPU_BIND": cores["serving"],
            },
        }
        procs = {}
        for name in ("teacher", "trainer", "serving"):
            prefix = f"DISTILLERY_{name.upper()}_"
            # Service state (the trainer's run files and work folders) lives in the run folder: a run interrupted in
            # an earlier job must not resume in this one.
            service_env = {**common, **env[name], f"{prefix}HOME": str(self.run_dir),
                           f"{prefix}REGISTRY_DIR": str(self.registry.root),
                           f"{prefix}MODELS_DIR": str(self.home / "models"), f"{prefix}LOG_FORMAT": "json"}  # fmt: skip
            nice = p.trainer_nice if name == "trainer" else 0
            log = self.run_dir / "logs" / f"{name}.log"
            procs[name] = self.group.add(ServiceProcess(name, service_env, log, nice=nice))
            procs[name].start()
        for name, proc in procs.items():
            proc.wait_healthy(timeout_s=300)
            self.console.log(f"{name} SERVING on {proc.address} (metrics {proc.metrics_url}, log {proc.log_path})")
        return procs

    def record_plan(self) -> None:
        r, plan = self.result, self.plan
        r.eval_prompts, r.train_prompts = plan.eval_prompts, plan.generated_prompts
        r.scored_prompts = plan.scored_prompts
        r.prompt_variants = plan.variants
        r.dataset = {"train_lines": len(self.job.train), "eval_lines": len(self.job.eval),
                     "eval_used": plan.eval_prompts, "train_generated": plan.generated_prompts,
                     "train_scored": plan.scored_prompts, "train_unused": plan.unused_train}  # fmt: skip

    def feed_order(self) -> list[pb.common.PromptRecord]:
        """Every prompt record in the order the teacher gets them: a first share of the training prompts, then the
        held-out ones in every phrasing, then the rest (published once the teacher has answered those: `held_at`).
        The trainer starts on the first share while the teacher answers the held-out prompts; its first evaluation
        waits until every held-out answer is in."""
        head = self.profile.feed_head
        train = self.plan.train_records
        return [*train[:head], *self.plan.eval_records, *train[head:]]

    @property
    def held_at(self) -> int:
        """How many records of `feed_order` the teacher answers before the rest is published."""
        return min(self.profile.feed_head, len(self.plan.train_records)) + len(self.plan.eval_records)

    def run_spec(self) -> pb.trainer.RunSpec:
        from services.trainer.recipes import default_run_spec

        p, job = self.profile, self.job
        spec = default_run_spec(task=job.name, run_id=f"{job.recipe.name}-{p.name}-{int(time.time())}",
                                max_steps=p.max_steps)  # fmt: skip
        student = job.student or p.student
        if student is None:
            spec.ClearField("student")  # the trainer's default student for this teacher
        else:
            spec.student.CopyFrom(student)
        spec.checker = job.checker
        spec.schedule.batch_size = p.batch_size
        spec.schedule.eval_every_steps = p.eval_every_steps
        spec.schedule.learning_rate = p.learning_rate
        spec.schedule.sample_reuse = p.sample_reuse
        spec.eval.max_prompts = self.plan.eval_prompts
        spec.eval.max_new_tokens = p.eval_max_new_tokens
        spec.eval.min_eval_samples = len(self.plan.eval_records)  # every held-out answer, in every phrasing
        spec.gate.CopyFrom(p.gate)
        if job.gate_metric:
            spec.gate.metric = job.gate_metric
        if job.gate_min_score is not None:
            spec.gate.min_score = job.gate_min_score
        verify = job.recipe.verify_correct and bool(job.checker)
        spec.data.verify = pb.trainer.VERIFY_MODE_KEEP_CORRECT if verify else pb.trainer.VERIFY_MODE_KEEP_ALL
        spec.loss.CopyFrom(job.recipe.loss)
        spec.on_policy.MergeFrom(p.on_policy)
        fraction = job.on_policy_fraction if job.on_policy_fraction is not None else job.recipe.on_policy_fraction
        spec.on_policy.fraction = fraction
        spec.seed = p.seed
        return spec

    # -- the run --------------------------------------------------------------------------------------------------
    def distil(self, procs: dict[str, ServiceProcess], bootstrap: str) -> RunWatch:
        from services.demo.load import ClientLoad
        from services.trainer.recipes import describe_student

        p = self.profile
        spec = self.run_spec()
        with channels.channel(procs["trainer"].address) as channel:
            stub = pb.trainer_grpc.TrainerServiceStub(channel)
            run = stub.StartRun(pb.trainer.StartRunRequest(spec=spec), timeout=120).run
        self.run_id = run_id = run.spec.run_id
        self.result.student_recipe = describe_student(run.spec.student)
        self.result.on_policy_fraction = run.spec.on_policy.fraction
        watch = RunWatch()
        watcher = threading.Thread(target=watch_run, args=(procs["trainer"].address, run_id, watch), daemon=True)
        watcher.start()
        teacher_metrics = procs["teacher"].metrics_url
        records = self.feed_order()
        held_at = self.held_at
        feeder = Feeder(KafkaSettings(bootstrap=bootstrap), records,
                        lambda: scrape(teacher_metrics).get(PROMPT_LAG), p.feed_backlog, hold_at=held_at,
                        released=lambda: scrape(teacher_metrics).get(PROMPTS_CONSUMED, 0) >= held_at)  # fmt: skip
        feeder.start()
        prompts = [e.content.chat() for e in self.job.eval[: p.eval_prompts] if e.content.messages]
        load = ClientLoad(procs["serving"].address, prompts or [[{"role": "user", "content": "Hello"}]],
                          p.load_streams, p.load_max_tokens, p.load_think_s, p.load_temperature)  # fmt: skip
        load.start()
        deadline = time.monotonic() + p.time_budget_s
        self.first_step_at = None
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn())  # fmt: skip
        try:
            with Progress(*columns, console=self.console) as bars:
                feed_bar = bars.add_task("prompts sent to the teacher", total=len(records), info="")
                steps_bar = bars.add_task("training steps", total=p.max_steps, info="")
                load_bar = bars.add_task("client streams", total=None, info="")
                while not watch.done.wait(1.0):
                    self.group.check_alive()
                    if feeder.error is not None:
                        raise DemoFailed(f"publishing training prompts failed: {feeder.error}")
                    bars.update(feed_bar, completed=feeder.published)
                    prog = watch.progress
                    if prog is not None:
                        bars.update(steps_bar, completed=prog.step, info=_progress_info(prog, watch))
                        if self.first_step_at is None and prog.step >= 1:
                            self.first_step_at = time.monotonic()  # seen within a poll (1 s) of the first step
                            if p.budget_from_first_step:
                                deadline = self.first_step_at + p.time_budget_s
                    stats = load.stats()
                    bars.update(load_bar, completed=stats.finished,
                                info=f"failed {stats.failed}  versions {sorted(stats.versions)}")  # fmt: skip
                    # At max_steps the run is only finishing its last evaluation: let it end by itself.
                    if time.monotonic() > deadline and (prog is None or not p.max_steps or prog.step < p.max_steps):
                        self.stopped_at = time.monotonic()
                        with channels.channel(procs["trainer"].address) as channel:
                            pb.trainer_grpc.TrainerServiceStub(channel).StopRun(
                                pb.trainer.StopRunRequest(run_id=run_id, evaluate=True), timeout=60
                            )
                        watch.done.wait(300)  # the final checkpoint is evaluated (held-out split) and gated
                        self.result.notes.append(_stop_note(p.time_budget_s, watch))
                        break
            self.wait_for_last_promotion(procs["serving"].address)
        finally:
            feeder.stop()
            load.stop()
        self.result.prompts_sent = feeder.published
        results = load.results()
        self.result.streams = len(results)
        self.result.failed_requests = sum(1 for r in results if not r.ok)
        self.result.stream_wpm = [r.wpm for r in results if r.ok and r.wpm is not None]
        if watch.progress is not None and watch.progress.state == pb.trainer.RUN_STATE_FAILED:
            raise DemoFailed(f"the trainer run failed: {watch.progress.error}")
        return watch

    def wait_for_last_promotion(self, address: str, timeout_s: float = 120.0) -> None:
        """Waits until serving serves the newest promoted checkpoint (the last swap of the run)."""
        promoted = self.registry.latest_promoted()
        if promoted is None:
            self.result.notes.append("no checkpoint passed the gate: serving kept its initial model")
            return
        deadline = time.monotonic() + timeout_s
        with channels.channel(address) as channel:
            stub = pb.serving_grpc.ServingServiceStub(channel)
            while time.monotonic() < deadline:
                model = stub.GetModel(pb.serving.GetModelRequest(), timeout=10).model
                if model.version >= promoted.version:
                    return
                time.sleep(0.5)
        self.result.notes.append(f"serving did not reach version {promoted.version} within {timeout_s:.0f}s")

    def collect(self, procs: dict[str, ServiceProcess], watch: RunWatch, teacher_dir: Path) -> None:
        from services.demo.collect import collect

        collect(self.result, self.registry, procs, watch, teacher_dir, self.run_id)

    def measure_speed(self, teacher_dir: Path) -> None:
        """Teacher vs student through the serving service, with the rest of the pipeline stopped."""
        from services.demo.speed import compare

        student = self.registry.latest_promoted() or self.registry.latest()
        if student is None:
            self.result.notes.append("no student checkpoint: speed not measured")
            return
        self.group.stop_all()  # the measurement gets the machine to itself
        chats = [e.content.chat() for e in self.job.eval[: self.profile.eval_prompts] if e.content.messages]
        bench = compare(self.result, self.run_dir, student.path, teacher_dir, self.profile, chats)
        (self.run_dir / "speed.json").write_text(json.dumps(bench, indent=2))

    def run(self) -> dict[str, Any]:
        try:
            with self.phase("broker", "starting the Kafka-protocol broker"):
                bootstrap = self.kafka_bootstrap()
            with self.phase("teacher_model", "preparing the teacher model"):
                teacher_dir = self.teacher_dir()
            with self.phase("services", "starting teacher, trainer and serving (vLLM engines take a while)"):
                procs = self.start_services(bootstrap, teacher_dir)
            self.record_plan()
            start = time.monotonic()
            watch = self.distil(procs, bootstrap)
            self.result.phases["distil"] = time.monotonic() - start
            self.collect(procs, watch, teacher_dir)
            with self.phase("speed", "measuring teacher vs student through serving (fresh processes, one at a time)"):
                self.measure_speed(teacher_dir)
        finally:
            self.shutdown()
        self.result.wall_s = time.monotonic() - self._t0
        return write_report(self.result, self.run_dir)

    def shutdown(self) -> None:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short and leave processes behind.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            codes = self.group.stop_all()
            if codes:
                self.console.log(f"stopped services: {codes}")
            if self._started_broker:
                broker.stop(self.run_dir)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _progress_info(prog: pb.trainer.RunProgress, watch: RunWatch) -> str:
    info = f"loss {prog.loss:.3f}  {prog.tokens_per_s:.0f} tok/s"
    if prog.on_policy_requested:
        info += f"  on-policy {prog.on_policy_received}/{prog.on_policy_requested}"
    last = watch.evals[-1] if watch.evals else {}
    if last.get("gate_score") is not None:
        info += f"  held-out {last['gate_metric']} {last['gate_score']:.2f}"
        if last.get("teacher_accuracy_best_prompt") is not None and last["gate_metric"] == "accuracy":
            info += f" (teacher {last['teacher_accuracy_best_prompt']:.2f})"
    return info


def core_layout(cpus: list[int]) -> dict[str, str]:
    """Cores for each service of the pipeline (`cpu_bind` values; "" leaves the trainer unpinned).

    On 2 cores the teacher gets one to itself and the trainer shares the other with serving. Serving goes with the
    trainer, not with the teacher, whatever the recipe: measured on a 2-core AVX2 machine with serving beside the
    teacher, 315 of 412 client streams fell below 238 wpm (the teacher model, served until the first promotion, and
    the teacher's own work on one core), while the trainer beside serving trained at ≈half its speed alone (56 vs
    ≈114 target tokens/s): readers come first. On an AVX512 machine, with the trainer floating it trained at ≈60% of
    its speed alone. From 3 cores each engine gets one and the trainer the rest."""
    if len(cpus) >= 3:
        return {"teacher": str(cpus[-1]), "serving": str(cpus[-2]), "trainer": ",".join(map(str, cpus[:-2]))}
    if len(cpus) == 2:
        return {"teacher": str(cpus[1]), "serving": str(cpus[0]), "trainer": str(cpus[0])}
    return {"teacher": str(cpus[0]), "serving": str(cpus[0]), "trainer": ""}


__all__ = ["DemoFailed", "Pipeline", "ServiceFailed", "install_sigterm_as_interrupt"]


def _stop_note(budget_s: float, watch: RunWatch) -> str:
    """What stopping at the time budget left: an evaluated last checkpoint, or why there is none."""
    prog = watch.progress
    step = prog.step if prog is not None else 0
    if watch.evals and watch.evals[-1]["step"] == step:
        return f"stopped the run at the time budget ({budget_s:.0f}s), last checkpoint (step {step}) evaluated"
    return (
        f"stopped the run at the time budget ({budget_s:.0f}s) at step {step}, not evaluated: the teacher had not "
        "answered every held-out prompt yet (the trainer evaluates only on the complete held-out set)"
    )
