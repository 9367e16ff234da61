"""`distillery demo`: the whole pipeline on embedded defaults, phase by phase, with a report at the end.

    broker → teacher model → teacher, trainer, serving processes → prompts → distillation run with client load
    on serving (hot-swaps as students are promoted) → teacher vs student speed through serving → report

Everything the demo starts (broker, three service processes) is stopped at the end, on Ctrl-C and on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from services.common import broker, pb
from services.common.models import DEFAULT_TEACHER, parameter_count, prepare_default_teacher
from services.common.process import ProcessGroup, ServiceFailed, ServiceProcess
from services.common.registry import Registry
from services.common.settings import KafkaSettings
from services.demo.profiles import Profile
from services.demo.report import DemoResult, write_report
from services.demo.scrape import scrape
from services.tasks import Problem, get_task

#: The teacher's counter of samples the broker acknowledged (services/teacher/metrics.py), read from its /metrics.
SAMPLES_PUBLISHED = "distillery_teacher_samples_published_total"
TERMINAL = {pb.trainer.RUN_STATE_SUCCEEDED, pb.trainer.RUN_STATE_FAILED, pb.trainer.RUN_STATE_STOPPED}


class DemoFailed(RuntimeError):
    pass


@dataclass
class RunWatch:
    """The trainer run as seen through WatchRun (updated by a background thread)."""

    progress: pb.trainer.RunProgress | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _eval_dict(e: pb.trainer.EvalMetrics) -> dict[str, Any]:
    out: dict[str, Any] = {"step": e.step, "eval_prompts": e.eval_prompts}
    for name in ("accuracy", "teacher_accuracy", "kl", "top1_agreement", "perplexity"):
        out[name] = getattr(e, name) if e.HasField(name) else None
    return out


def watch_run(address: str, run_id: str, watch: RunWatch) -> None:
    """Follows WatchRun until the run ends (reconnecting if the stream drops)."""
    seen_steps: set[int] = set()
    seen_evals: set[int] = set()
    while not watch.done.is_set():
        try:
            with grpc.insecure_channel(address) as channel:
                stub = pb.trainer_grpc.TrainerServiceStub(channel)
                for response in stub.WatchRun(pb.trainer.WatchRunRequest(run_id=run_id)):
                    p = response.progress
                    watch.progress = p
                    if p.step and p.step not in seen_steps:
                        seen_steps.add(p.step)
                        watch.history.append({"step": p.step, "loss": p.loss, **dict(p.loss_components),
                                              "tokens_per_s": p.tokens_per_s, "lag": p.lag})  # fmt: skip
                    if p.HasField("last_eval") and p.last_eval.step not in seen_evals:
                        seen_evals.add(p.last_eval.step)
                        watch.evals.append(_eval_dict(p.last_eval))
                    if p.state in TERMINAL:
                        watch.done.set()
                        return
        except grpc.RpcError as exc:
            watch.error = f"WatchRun: {exc.code().name}: {exc.details()}"
            time.sleep(1.0)


class Demo:
    """One demo run in `run_dir`; `run()` returns the summary dict."""

    def __init__(self, profile: Profile, home: Path, run_dir: Path, console: Console, price_per_hour: float) -> None:
        self.profile = profile
        self.home = home
        self.run_dir = run_dir
        self.console = console
        self.group = ProcessGroup()
        self.result = DemoResult(profile=profile.name, teacher_model="", machine_price_per_hour=price_per_hour)
        self.task = get_task("math_word_problems")
        self.registry = Registry(run_dir / "registry")
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
        state = broker.start(self.run_dir)
        self._started_broker = True
        return state.bootstrap

    def teacher_dir(self) -> Path:
        if self.profile.teacher == "default":
            self.result.teacher_model = DEFAULT_TEACHER
            return prepare_default_teacher(self.home / "models")
        from services.common.tiny import build_llama

        self.result.teacher_model = "tiny random Llama (smoke profile)"
        return build_llama(self.run_dir / "tiny-teacher", hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1)

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
        env: dict[str, dict[str, str]] = {
            "teacher": {
                "DISTILLERY_TEACHER_MODEL": str(teacher_dir),
                "DISTILLERY_TEACHER_VLLM__ENFORCE_EAGER": str(p.enforce_eager).lower(),
                "DISTILLERY_TEACHER_VLLM__KV_CACHE_GIB": str(p.kv_cache_gib),
                "DISTILLERY_TEACHER_VLLM__MAX_MODEL_LEN": "1024",
                "DISTILLERY_TEACHER_MAX_N": str(max(p.samples_per_prompt, 1)),
                "DISTILLERY_TEACHER_VLLM__CPU_BIND": cores["teacher"],
            },
            "trainer": {
                "DISTILLERY_TRAINER_TEACHER_MODEL": str(teacher_dir),
                "DISTILLERY_TRAINER_TORCH_THREADS": str(p.trainer_threads),
                "DISTILLERY_TRAINER_BATCH_WAIT_S": str(p.batch_wait_s),
                "DISTILLERY_TRAINER_CPU_BIND": cores["trainer"],
            },
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
            # an earlier demo must not resume in this one.
            service_env = {**common, **env[name], f"{prefix}HOME": str(self.run_dir),
                           f"{prefix}REGISTRY_DIR": str(self.registry.root),
                           f"{prefix}MODELS_DIR": str(self.home / "models"), f"{prefix}LOG_FORMAT": "json"}  # fmt: skip
            nice = p.serving_nice if name == "serving" else 0
            log = self.run_dir / "logs" / f"{name}.log"
            procs[name] = self.group.add(ServiceProcess(name, service_env, log, nice=nice))
            procs[name].start()
        for name, proc in procs.items():
            proc.wait_healthy(timeout_s=300)
            self.console.log(f"{name} SERVING on {proc.address} (metrics {proc.metrics_url}, log {proc.log_path})")
        return procs

    def problems(self) -> tuple[list[Problem], list[Problem]]:
        p = self.profile
        train = self.task.generate(p.train_prompts + p.scored_prompts, seed=p.seed, split="train",
                                   difficulty=p.difficulty)  # fmt: skip
        held_out = self.task.generate(p.eval_prompts, seed=p.seed + 1, split="eval", difficulty=p.difficulty)
        return train, held_out

    def publish(self, bootstrap: str, train: list[Problem], held_out: list[Problem], teacher: ServiceProcess) -> None:
        from services.teacher.prompts import problem_record, publish

        p = self.profile
        sampling_train = pb.common.SamplingParams(
            temperature=p.temperature, n=p.samples_per_prompt, max_tokens=p.max_tokens, logprobs=p.top_k
        )
        # Held-out prompts: greedy, one answer, so the teacher's accuracy is measured the way the student's is.
        sampling_eval = pb.common.SamplingParams(temperature=0.0, n=1, max_tokens=p.max_tokens, logprobs=p.top_k)
        sampling_scored = pb.common.SamplingParams(logprobs=p.top_k)

        def record(problem: Problem, sampling: pb.common.SamplingParams, scored: bool = False) -> Any:
            out = problem_record(problem, self.task.name, sampling)
            # The worked solution ("3 + 5 = 8. The answer is 8.") is the reference: the checker reads its final
            # number, and scored prompts make it the completion the teacher scores.
            out.reference_answer = problem.solution
            out.score_reference = scored
            return out

        generated = [record(problem, sampling_train) for problem in train[: p.train_prompts]]
        scored = [record(problem, sampling_scored, scored=True) for problem in train[p.train_prompts :]]
        # The generated prompts are spread evenly among the scored ones, so the trainer sees both kinds from the start.
        every = max(1, -(-(len(generated) + len(scored)) // max(1, len(generated))))
        mixed: list[pb.common.PromptRecord] = []
        for i, scored_record in enumerate(scored):
            if i % every == 0 and generated:
                mixed.append(generated.pop(0))
            mixed.append(scored_record)
        # The held-out prompts go first, and the training ones only once the teacher has answered them all: the trainer
        # evaluates once it has every held-out answer, and with scored prompts in the same batches the teacher's greedy
        # answers trickled out over its next 2,000 samples (measured: no evaluation before step 500 of 640).
        kafka = KafkaSettings(bootstrap=bootstrap)
        publish(kafka, [record(problem, sampling_eval) for problem in held_out])
        self.wait_for_samples(teacher, len(held_out))
        publish(kafka, mixed + generated)
        self.result.scored_prompts = len(scored)
        self.result.train_prompts, self.result.eval_prompts = p.train_prompts, len(held_out)

    def wait_for_samples(self, teacher: ServiceProcess, count: int, timeout_s: float = 600.0) -> None:
        """Polls the teacher's metrics until it has published `count` samples (or the timeout, noted in the report)."""
        deadline = time.monotonic() + timeout_s
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=self.console) as bars:  # fmt: skip
            task = bars.add_task("teacher answers the held-out problems", total=count)
            while True:
                self.group.check_alive()
                published = scrape(teacher.metrics_url).get(SAMPLES_PUBLISHED, 0.0)
                bars.update(task, completed=min(published, count))
                if published >= count:
                    return
                if time.monotonic() > deadline:
                    self.result.notes.append(f"the teacher had answered {published:.0f} of {count} held-out problems "
                                             f"after {timeout_s:.0f}s; training prompts published anyway")  # fmt: skip
                    return
                time.sleep(0.5)

    def run_spec(self) -> pb.trainer.RunSpec:
        from services.trainer.recipes import default_run_spec

        p = self.profile
        spec = default_run_spec(task=self.task.name, run_id=f"demo-{p.name}-{int(time.time())}",
                                student=p.student, max_steps=p.max_steps)  # fmt: skip
        spec.schedule.batch_size = p.batch_size
        spec.schedule.eval_every_steps = p.eval_every_steps
        spec.schedule.learning_rate = p.learning_rate
        spec.schedule.sample_reuse = p.sample_reuse
        spec.eval.max_prompts = p.eval_prompts
        spec.eval.max_new_tokens = p.eval_max_new_tokens
        spec.eval.min_eval_samples = p.eval_prompts
        spec.gate.CopyFrom(p.gate)
        spec.data.verify = p.verify
        if p.loss is not None:
            spec.loss.CopyFrom(p.loss)
        spec.seed = p.seed
        return spec

    # -- the run --------------------------------------------------------------------------------------------------
    def distil(self, procs: dict[str, ServiceProcess], held_out: list[Problem]) -> RunWatch:
        from services.demo.load import ClientLoad

        p = self.profile
        spec = self.run_spec()
        with grpc.insecure_channel(procs["trainer"].address) as channel:
            stub = pb.trainer_grpc.TrainerServiceStub(channel)
            run = stub.StartRun(pb.trainer.StartRunRequest(spec=spec), timeout=120).run
        run_id = run.spec.run_id
        self.result.student_recipe = _describe(spec.student)
        watch = RunWatch()
        watcher = threading.Thread(target=watch_run, args=(procs["trainer"].address, run_id, watch), daemon=True)
        watcher.start()
        prompts = [self.task.messages(problem) for problem in held_out]
        load = ClientLoad(procs["serving"].address, prompts, p.load_streams, p.load_max_tokens, p.load_think_s,
                          p.load_temperature)  # fmt: skip
        load.start()
        expected_samples = p.train_prompts * p.samples_per_prompt + p.scored_prompts + p.eval_prompts
        deadline = time.monotonic() + p.time_budget_s
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn())  # fmt: skip
        try:
            with Progress(*columns, console=self.console) as bars:
                samples_bar = bars.add_task("teacher samples", total=expected_samples, info="")
                steps_bar = bars.add_task("training steps", total=p.max_steps, info="")
                load_bar = bars.add_task("client streams", total=None, info="")
                while not watch.done.wait(1.0):
                    self.group.check_alive()
                    teacher = scrape(procs["teacher"].metrics_url)
                    published = teacher.get(SAMPLES_PUBLISHED, 0.0)
                    bars.update(samples_bar, completed=min(published, expected_samples))
                    prog = watch.progress
                    if prog is not None:
                        last = watch.evals[-1] if watch.evals else {}
                        acc = last.get("accuracy")
                        info = f"loss {prog.loss:.3f}  {prog.tokens_per_s:.0f} tok/s"
                        if acc is not None:
                            info += f"  held-out acc {acc:.2f} (teacher {last.get('teacher_accuracy') or 0:.2f})"
                        bars.update(steps_bar, completed=prog.step, info=info)
                    stats = load.stats()
                    bars.update(load_bar, completed=stats.finished,
                                info=f"failed {stats.failed}  versions {sorted(stats.versions)}")  # fmt: skip
                    # At max_steps the run is only finishing its last evaluation: let it end by itself.
                    if time.monotonic() > deadline and (prog is None or not p.max_steps or prog.step < p.max_steps):
                        note = f"stopped the run at the time budget ({p.time_budget_s:.0f}s), last checkpoint evaluated"
                        self.result.notes.append(note)
                        with grpc.insecure_channel(procs["trainer"].address) as channel:
                            pb.trainer_grpc.TrainerServiceStub(channel).StopRun(
                                pb.trainer.StopRunRequest(run_id=run_id, evaluate=True), timeout=60
                            )
                        watch.done.wait(300)  # the final checkpoint is evaluated (held-out split) and gated
                        break
            self.wait_for_last_promotion(procs["serving"].address)
        finally:
            load.stop()
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
        with grpc.insecure_channel(address) as channel:
            stub = pb.serving_grpc.ServingServiceStub(channel)
            while time.monotonic() < deadline:
                model = stub.GetModel(pb.serving.GetModelRequest(), timeout=10).model
                if model.version >= promoted.version:
                    return
                time.sleep(0.5)
        self.result.notes.append(f"serving did not reach version {promoted.version} within {timeout_s:.0f}s")

    def collect(self, procs: dict[str, ServiceProcess], watch: RunWatch, teacher_dir: Path) -> None:
        r = self.result
        r.history, r.evals = watch.history, watch.evals
        r.teacher_params = parameter_count(teacher_dir)
        serving = scrape(procs["serving"].metrics_url)
        r.swaps = int(serving.get('distillery_serving_swaps_total{result="ok"}', 0))
        teacher = scrape(procs["teacher"].metrics_url)
        r.teacher_samples = int(teacher.get(SAMPLES_PUBLISHED, 0))
        teacher_accs = [e["teacher_accuracy"] for e in r.evals if e.get("teacher_accuracy") is not None]
        r.teacher_accuracy = teacher_accs[-1] if teacher_accs else None
        for ckpt in self.registry.checkpoints():
            promoted = self.registry.is_promoted(ckpt.version)
            r.checkpoints.append({"version": ckpt.version, "step": ckpt.manifest.step, "promoted": promoted,
                                  **ckpt.manifest.metrics})  # fmt: skip
        served = self.registry.latest_promoted()
        chosen = served or self.registry.latest()
        if chosen is not None:
            r.student_params = chosen.manifest.parameter_count
            r.student_accuracy = chosen.manifest.metrics.get("accuracy")
            if served is None:
                r.notes.append("student figures are from the last checkpoint (none was promoted)")
        r.served_versions = sorted({int(v) for v in r.served_versions} | set(self.registry.promoted_versions()))

    def measure_speed(self, procs: dict[str, ServiceProcess], teacher_dir: Path) -> None:
        """Teacher vs student through the serving service, with the rest of the pipeline stopped."""
        from services.demo.speed import compare

        student = self.registry.latest_promoted() or self.registry.latest()
        if student is None:
            self.result.notes.append("no student checkpoint: speed not measured")
            return
        self.group.stop_all()  # the measurement gets the machine to itself
        bench = compare(self.result, self.run_dir, student.path, teacher_dir, self.profile)
        (self.run_dir / "speed.json").write_text(json.dumps(bench, indent=2))

    def run(self) -> dict[str, Any]:
        try:
            with self.phase("broker", "starting the Kafka-protocol broker"):
                bootstrap = self.kafka_bootstrap()
            with self.phase("teacher_model", "preparing the teacher model"):
                teacher_dir = self.teacher_dir()
            with self.phase("services", "starting teacher, trainer and serving (vLLM engines take a while)"):
                procs = self.start_services(bootstrap, teacher_dir)
            with self.phase("prompts", "publishing prompts (the teacher answers the held-out ones first)"):
                train, held_out = self.problems()
                self.publish(bootstrap, train, held_out, procs["teacher"])
            start = time.monotonic()
            watch = self.distil(procs, held_out)
            self.result.phases["distil"] = time.monotonic() - start
            self.collect(procs, watch, teacher_dir)
            with self.phase("speed", "measuring teacher vs student through serving (fresh processes, one at a time)"):
                self.measure_speed(procs, teacher_dir)
        finally:
            self.shutdown()
        self.result.wall_s = time.monotonic() - self._t0
        return write_report(self.result, self.run_dir)

    def shutdown(self) -> None:
        codes = self.group.stop_all()
        if codes:
            self.console.log(f"stopped services: {codes}")
        if self._started_broker:
            broker.stop(self.run_dir)


def core_layout(cpus: list[int]) -> dict[str, str]:
    """Cores for each service of the pipeline (`cpu_bind` values; "" leaves the trainer unpinned).

    On 2 cores the teacher gets one to itself and the trainer shares the other with serving. Measured on 2 cores:
    with the trainer floating it trained at ≈60% of its speed alone; with the two engines sharing a core instead,
    the teacher published ≈2 samples/s and starved the trainer. From 3 cores each engine gets one and the trainer
    the rest."""
    if len(cpus) >= 3:
        return {"teacher": str(cpus[-1]), "serving": str(cpus[-2]), "trainer": ",".join(map(str, cpus[:-2]))}
    if len(cpus) == 2:
        return {"teacher": str(cpus[1]), "serving": str(cpus[0]), "trainer": str(cpus[0])}
    return {"teacher": str(cpus[0]), "serving": str(cpus[0]), "trainer": ""}


def _describe(recipe: pb.trainer.StudentRecipe) -> str:
    source = recipe.WhichOneof("source")
    if source == "pruned":
        p = recipe.pruned
        return (f"pruned from the teacher: {p.num_layers} layers, hidden {p.hidden_size}, MLP {p.intermediate_size}, "
                f"{p.num_attention_heads}/{p.num_key_value_heads} heads")  # fmt: skip
    return str(source)


def install_sigterm_as_interrupt() -> None:
    """SIGTERM stops the demo the way Ctrl-C does: the `finally` blocks stop every process it started."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


__all__ = ["Demo", "DemoFailed", "ServiceFailed", "install_sigterm_as_interrupt"]
