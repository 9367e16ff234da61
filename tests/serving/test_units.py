"""Fast unit tests: word counting and reading-speed meters, request validation, settings, start-up model choice."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.common import pb
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.registry import Registry
from services.common.vllm_engine import configure_env
from services.serving.metrics import BELOW_TARGET_GRACE_S, StreamMeter, count_words
from services.serving.servicer import prompt_from_request, sampling_from_proto
from services.serving.settings import LimitSettings, ServingSettings


@pytest.mark.parametrize(
    "pieces",
    [["Hello", " wor", "ld", "  and", " more\n", "x"], ["", " a", "b ", " c"], ["12", "+", "3 ", "= 15."], [" ", " "]],
)
def test_streamed_word_counts_add_up_to_split(pieces: list[str]) -> None:
    after_space, total = True, 0
    for piece in pieces:
        added, after_space = count_words(piece, after_space)
        total += added
    assert total == len("".join(pieces).split())


def test_stream_meter_words_per_minute_and_below_target() -> None:
    meter = StreamMeter(started=0.0)
    meter.chunk("The", 1, now=0.5)
    meter.chunk(" answer is", 2, now=1.5)
    meter.chunk(" 8.", 1, now=3.5)
    assert meter.words == 4
    assert meter.wpm() == pytest.approx(4 * 60 / 3.0)  # first to last token: 3 s
    assert meter.below_target(now=3.5)  # 80 wpm
    fast = StreamMeter(started=0.0)
    fast.chunk(" ".join(["w"] * 10), 10, now=0.1)
    assert not fast.below_target(now=0.1 + BELOW_TARGET_GRACE_S)  # 10 words in 1 s = 600 wpm
    before = REGISTRY.get_sample_value("distillery_serving_stream_words_per_minute_count") or 0
    meter.finish("ok")
    assert REGISTRY.get_sample_value("distillery_serving_stream_words_per_minute_count") == before + 1


LIMITS = LimitSettings(max_tokens=100, default_max_tokens=50, max_stop_strings=2)


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (pb.common.SamplingParams(temperature=-1), "sampling.temperature=-1.0"),
        (pb.common.SamplingParams(temperature=math.nan), "sampling.temperature=nan"),
        (pb.common.SamplingParams(top_p=0), "sampling.top_p=0.0"),
        (pb.common.SamplingParams(top_k=-2), "sampling.top_k=-2"),
        (pb.common.SamplingParams(max_tokens=0), "sampling.max_tokens=0"),
        (pb.common.SamplingParams(n=2), "sampling.n=2"),
        (pb.common.SamplingParams(logprobs=5), "sampling.logprobs=5"),
        (pb.common.SamplingParams(stop=["a", "b", "c"]), "sampling.stop="),
        (pb.common.SamplingParams(extra={"seed": "1"}), "sampling.extra['seed']='1'"),
        (pb.common.SamplingParams(extra={"ignore_eos": "yes"}), "sampling.extra['ignore_eos']='yes'"),
        (pb.common.SamplingParams(presence_penalty=3), "sampling.presence_penalty=3.0"),
    ],
)
def test_bad_sampling_values_name_the_field(sampling: pb.common.SamplingParams, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        sampling_from_proto(sampling, LIMITS)
    assert str(err.value).startswith(field)


def test_sampling_defaults_and_limits() -> None:
    default = sampling_from_proto(pb.common.SamplingParams(), LIMITS)
    assert (default.max_tokens, default.temperature, default.top_p, default.ignore_eos) == (50, 1.0, 1.0, False)
    custom = sampling_from_proto(
        pb.common.SamplingParams(max_tokens=7, temperature=0, extra={"ignore_eos": "true", "min_tokens": "3"}), LIMITS
    )
    assert (custom.max_tokens, custom.temperature, custom.ignore_eos, custom.min_tokens) == (7, 0.0, True, 3)
    with pytest.raises(ResourceExhausted, match="max_tokens=101"):
        sampling_from_proto(pb.common.SamplingParams(max_tokens=101), LIMITS)


def test_prompt_is_messages_or_text() -> None:
    chat = pb.serving.GenerateRequest(messages=[pb.common.ChatMessage(role="user", content="hi")])
    assert prompt_from_request(chat) == (("user", "hi"),)
    assert prompt_from_request(pb.serving.GenerateRequest(prompt="raw")) == "raw"
    with pytest.raises(InvalidArgument, match="messages"):
        prompt_from_request(pb.serving.GenerateRequest())
    with pytest.raises(InvalidArgument, match=r"messages\[0\]\.role='robot'"):
        prompt_from_request(pb.serving.GenerateRequest(messages=[pb.common.ChatMessage(role="robot")]))
    with pytest.raises(InvalidArgument, match="not both"):
        prompt_from_request(pb.serving.GenerateRequest(prompt="x", messages=chat.messages))


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = ServingSettings()
    assert (defaults.grpc_port, defaults.metrics_port, defaults.swap.strategy) == (50053, 9103, "standby")
    monkeypatch.setenv("DISTILLERY_SERVING_LIMITS__MAX_TOKENS", "77")
    monkeypatch.setenv("DISTILLERY_SERVING_VLLM__MAX_NUM_SEQS", "9")
    monkeypatch.setenv("DISTILLERY_SERVING_SWAP__STRATEGY", "in_place")
    monkeypatch.setenv("DISTILLERY_SERVING_INITIAL_MODEL", "smollm2-135m-instruct")
    settings = ServingSettings()
    assert settings.limits.max_tokens == 77 and settings.vllm.max_num_seqs == 9
    assert settings.swap.strategy == "in_place" and settings.initial_model == "smollm2-135m-instruct"


def _register(registry: Registry, source: Path, promote: bool = True) -> object:
    staged = registry.staging_dir()
    for file in source.iterdir():
        shutil.copy(file, staged / file.name)
    ckpt = registry.write(staged, run_id="run", step=1, parameter_count=1)
    if promote:
        registry.promote(ckpt)
    return ckpt


async def test_start_up_prefers_the_newest_promoted_checkpoint_that_verifies(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from services.serving.main import ServingApp

    settings = ServingSettings(home=tmp_path, watch_checkpoints=False, initial_model=str(tiny_model_dir))
    app = ServingApp(settings)
    assert [m.version for m in app._candidates()] == [0]  # only the configured model
    _register(app.registry, tiny_model_dir)  # v1, promoted
    _register(app.registry, tiny_model_dir, promote=False)  # v2, not promoted
    broken = _register(app.registry, tiny_model_dir)  # v3, promoted, then corrupted
    (broken.path / "config.json").write_text("{}")  # type: ignore[attr-defined]
    assert [m.version for m in app._candidates()] == [1, 0]
    assert next(iter(app._candidates())).registry_uri.startswith("file://")


def test_bench_service_serves_its_model_not_a_promoted_checkpoint(tmp_path: Path) -> None:
    """The serving bench points each service at an empty registry of its own: serving starts from the newest
    promoted checkpoint of its registry, and the demo runs the bench in a run folder whose registry has students
    (measured before this: the "teacher" probes served the promoted student)."""
    from services.bench.serving import ServingBenchConfig, service_env

    config = ServingBenchConfig(home=tmp_path)
    env = service_env(config, tmp_path / "teacher")
    registry_dir = Path(env["DISTILLERY_SERVING_REGISTRY_DIR"])
    assert registry_dir != tmp_path / "registry" and not registry_dir.exists()
    assert Registry(registry_dir).promoted_versions() == []
    assert env["DISTILLERY_SERVING_INITIAL_MODEL"] == str(tmp_path / "teacher")
    assert service_env(config, tmp_path / "x")["DISTILLERY_SERVING_REGISTRY_DIR"] != str(registry_dir)


def test_standby_engines_leave_a_core_for_the_standby(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("services.common.vllm_engine._INHERITED_OMP_NUM_THREADS", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert ServingSettings().engine_settings().omp_threads == 3
    # configure_env writes the engines' OMP_NUM_THREADS; a second app in this process still gets 3, not 2.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    configure_env(ServingSettings().engine_settings())
    assert os.environ["OMP_NUM_THREADS"] == "3"
    assert ServingSettings().engine_settings().omp_threads == 3
    # A CPU limit passed as OMP_NUM_THREADS (the Kubernetes manifests) is the budget when it is smaller.
    monkeypatch.setattr("services.common.vllm_engine._INHERITED_OMP_NUM_THREADS", "2")
    assert ServingSettings().engine_settings().omp_threads == 1
    monkeypatch.setattr("services.common.vllm_engine._INHERITED_OMP_NUM_THREADS", None)
    # An explicit thread count or binding, another strategy or a single core: the settings as given.
    assert ServingSettings(vllm={"omp_threads": 4}).engine_settings().omp_threads == 4
    assert ServingSettings(vllm={"cpu_bind": "0"}).engine_settings().omp_threads is None
    assert ServingSettings(swap={"strategy": "engine"}).engine_settings().omp_threads is None
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert ServingSettings().engine_settings().omp_threads is None


def test_every_replica_gets_its_own_checkpoint_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two pods with the same host name (hostNetwork) and PID (the service is PID 1 in its container) still get two
    groups: one group shared by two replicas would give each only some of the checkpoint topic's partitions."""
    import os
    import socket

    from services.serving.watcher import default_group

    monkeypatch.setattr(socket, "gethostname", lambda: "node-1")
    monkeypatch.setattr(os, "getpid", lambda: 1)
    groups = {default_group() for _ in range(50)}
    assert len(groups) == 50
    assert all(g.startswith("distillery-serving-node-1-1-") for g in groups)


def test_headroom_is_the_median_open_stream_speed_over_the_target() -> None:
    """The autoscaler's signal: +Inf with nothing to judge, streams younger than the grace period left out, a
    stream still waiting for its first token counted at 0 words per minute."""
    import time

    from services.serving.metrics import OpenStreams, headroom

    assert headroom([]) == math.inf
    assert headroom([119.0, 238.0, 476.0]) == pytest.approx(1.0)
    streams = OpenStreams()
    streams.sweep()
    assert REGISTRY.get_sample_value("distillery_serving_wpm_headroom_ratio") == math.inf
    now = time.perf_counter()
    for words in (4, 8, 40):  # 4 s since the first token: 60, 120 and 600 wpm
        meter = streams.open()
        meter.chunk(" ".join(["w"] * words), words, now=now - 4.0)
    streams.open()  # just arrived: not judged yet
    assert streams.sweep() == 2
    assert REGISTRY.get_sample_value("distillery_serving_wpm_headroom_ratio") == pytest.approx(120 / 238, rel=0.01)
    waiting = streams.open()
    waiting.started = now - 2.0  # two seconds without a token
    streams.sweep()
    assert REGISTRY.get_sample_value("distillery_serving_wpm_headroom_ratio") == pytest.approx(90 / 238, rel=0.01)


class _ReloadingLLM:
    """Just enough of vLLM's AsyncLLM for `VllmEngine.reload`: the worker answers with the id map it now holds."""

    def __init__(self, loaded_digest: str) -> None:
        self.loaded_digest = loaded_digest
        self.model_config = type("ModelConfig", (), {"max_model_len": 64, "get_vocab_size": lambda self: 1024})()
        self.paused = False

    def get_tokenizer(self) -> None:
        return None

    async def pause_generation(self, **kwargs: object) -> None:
        self.paused = True

    async def resume_generation(self) -> None:
        self.paused = False

    async def reset_prefix_cache(self) -> None:
        pass

    async def collective_rpc(self, method: str, kwargs: dict[str, str]) -> list[dict[str, object]]:
        return [{"reprocessed": [], "output_vocab": self.loaded_digest}]


async def test_reload_fails_unless_the_engine_holds_the_checkpoints_id_map(tmp_path: Path) -> None:
    """Two restricted heads of the same size share a fingerprint: a reload that left the old id map is an error."""
    import torch
    from safetensors.torch import save_file

    from services.common.outvocab_vllm import token_ids_digest
    from services.serving.engine import VllmEngine

    ids = torch.tensor([0, 1, 2, 7, 9], dtype=torch.int64)
    save_file({"lm_head.token_ids": ids}, str(tmp_path / "model.safetensors"))
    good = _ReloadingLLM(token_ids_digest(ids))
    engine = VllmEngine(good, Path("old"))
    await engine.reload(tmp_path)
    assert engine.model_dir == tmp_path and not good.paused

    stale = _ReloadingLLM(token_ids_digest(torch.tensor([0, 1, 2, 8, 9])))
    engine = VllmEngine(stale, Path("old"))
    with pytest.raises(RuntimeError, match="output vocabulary"):
        await engine.reload(tmp_path)
    assert engine.model_dir == Path("old") and not stale.paused
