"""The built image, run as its pods run: entrypoint as uid 10001, the ConfigMaps' settings, volumes, gRPC."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import pb
from tests.image.buildah import Container
from tests.image.conftest import UID, pod_env

pytestmark = pytest.mark.image

QUESTION = "What is the capital of France?"
# vLLM's architectures named Distillery*, before and after it loads its general plugins (entry points) in a bare
# interpreter: the project's own code registers nothing here.
PLUGIN_PROBE = (
    "from vllm import ModelRegistry\n"
    "from vllm.plugins import load_general_plugins\n"
    "ours = lambda: [a for a in ModelRegistry.get_supported_archs() if a.startswith('Distillery')]\n"
    "before = ours()\n"
    "load_general_plugins()\n"
    "print(before, *ours())"
)
# vLLM's engine start inside the image includes torch.compile's first build on 2 shared cores.
START_TIMEOUT_S = 600.0


async def _health(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


def wait_serving(container: Container, address: str, service: str, log: Path) -> float:
    """Polls gRPC health from outside the container until SERVING; fails with the log if the process ends."""
    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT_S:
        assert container.process is not None
        if container.process.poll() is not None:
            pytest.fail(f"{service} exited {container.process.returncode}:\n{log.read_text()[-6000:]}")
        try:
            if asyncio.run(_health(address, service)) == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - started
        except grpc.RpcError:
            pass
        time.sleep(1)
    pytest.fail(f"{service} not SERVING after {START_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")


def serving_volumes(pod_volumes: dict[Path, str]) -> dict[Path, str]:
    """The serving Deployment mounts the registry read-only: only the trainer writes checkpoints."""
    return {host: inside + (":ro" if inside == "/registry" else "") for host, inside in pod_volumes.items()}


async def serving_generate(address: str, *, max_tokens: int, temperature: float) -> list[pb.serving.GenerateResponse]:
    """QUESTION sent to the serving container's `Generate` from outside it; the stream's chunks."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb.serving_grpc.ServingServiceStub(channel)
        request = pb.serving.GenerateRequest(
            messages=[pb.common.ChatMessage(role="user", content=QUESTION)],
            sampling=pb.common.SamplingParams(max_tokens=max_tokens, temperature=temperature),
        )
        return [r async for r in stub.Generate(request, timeout=120)]


def test_entrypoint_runs_as_uid_10001_and_only_volumes_are_writable(image: str, pod_volumes: dict) -> None:
    with Container(image, pod_volumes, {}, f"{UID}:{UID}") as container:
        assert container.entrypoint == ["distillery"]
        shown = container.run(["--help"])
        assert shown.returncode == 0, shown.stderr
        assert "teacher" in shown.stdout and "serving" in shown.stdout and "trainer" in shown.stdout
        probe = container.run(
            [
                "sh",
                "-c",
                "id -u; for d in /opt/distillery /usr /etc /tmp /var/cache/distillery /var/lib/distillery /registry;"
                ' do if touch "$d/.w" 2>/dev/null; then echo "$d rw"; rm "$d/.w"; else echo "$d ro"; fi; done',
            ],
            entrypoint=False,
        )
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.split()
    assert lines[0] == str(UID)
    states = dict(zip(lines[1::2], lines[2::2], strict=True))
    assert {d for d, s in states.items() if s == "rw"} == set(pod_volumes.values()), states


def test_teacher_answers_health_and_generate_from_outside(
    image: str, pod_volumes: dict, kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = pod_env("teacher", kafka_bootstrap)
    address = f"127.0.0.1:{env['DISTILLERY_TEACHER_GRPC_PORT']}"
    log = tmp_path / "teacher.log"
    with Container(image, pod_volumes, env, f"{UID}:{UID}") as container:
        container.start(["teacher", "serve"], log)
        wait_serving(container, address, "distillery.teacher.v1.TeacherService", log)

        async def generate() -> list[pb.teacher.GenerateResponse]:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb.teacher_grpc.TeacherServiceStub(channel)
                request = pb.teacher.GenerateRequest(
                    messages=[pb.common.ChatMessage(role="user", content=QUESTION)],
                    sampling=pb.common.SamplingParams(max_tokens=16, temperature=0.0, logprobs=5),
                )
                return [r async for r in stub.Generate(request, timeout=120)]

        chunks = asyncio.run(generate())
        answer = "".join(c.text_delta for c in chunks)
        print(f"teacher Generate ({QUESTION!r}): {answer!r}")
        assert "Paris" in answer
        assert all(len(lp.top_ids) == 5 for c in chunks for lp in c.logprobs)
        assert container.stop() == 0, log.read_text()[-4000:]


def test_serving_answers_generate_with_the_packaged_teacher(
    image: str, pod_volumes: dict, kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = pod_env("serving", kafka_bootstrap)
    assert env["DISTILLERY_SERVING_INITIAL_MODEL"] == "smollm2-135m-instruct", "the base serves the teacher first"
    address = f"127.0.0.1:{env['DISTILLERY_SERVING_GRPC_PORT']}"
    log = tmp_path / "serving.log"
    volumes = serving_volumes(pod_volumes)
    with Container(image, volumes, env, f"{UID}:{UID}") as container:
        container.start(["serving", "serve"], log)
        wait_serving(container, address, "distillery.serving.v1.ServingService", log)

        chunks = asyncio.run(serving_generate(address, max_tokens=16, temperature=0.0))
        answer = "".join(c.text_delta for c in chunks)
        print(f"serving Generate ({QUESTION!r}): {answer!r}")
        assert "Paris" in answer
        assert container.stop() == 0, log.read_text()[-4000:]


def test_serving_starts_on_a_promoted_student_with_a_restricted_head(
    image: str, pod_volumes: dict, kafka_bootstrap: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The image's serving loads the newest promoted checkpoint from the registry volume at start: a student with a
    task-restricted output vocabulary, served by the project's vLLM model class. vLLM also finds that class through
    the package's `vllm.general_plugins` entry point alone (the services register it themselves as well)."""
    from services.common.outvocab import trim_folder
    from services.common.registry import Registry
    from tests.serving.conftest import register

    head = sorted({0, 1, 2, *range(4, 1024, 2)})[:448]  # the special tokens and even ids only
    trim_folder(tiny_model_dir, head, tmp_path / "trimmed")
    registry_dir = next(host for host, inside in pod_volumes.items() if inside == "/registry")
    ckpt = register(Registry(registry_dir), tmp_path / "trimmed")  # promoted
    for path in [registry_dir, *registry_dir.rglob("*")]:
        os.chown(path, UID, UID)  # written by the trainer's uid in a cluster

    env = pod_env("serving", kafka_bootstrap)
    address = f"127.0.0.1:{env['DISTILLERY_SERVING_GRPC_PORT']}"
    log = tmp_path / "serving.log"
    volumes = serving_volumes(pod_volumes)
    with Container(image, volumes, env, f"{UID}:{UID}") as container:
        plugin = container.run(["python", "-c", PLUGIN_PROBE], entrypoint=False)
        assert plugin.returncode == 0, plugin.stderr[-3000:]
        assert plugin.stdout.split()[-2:] == ["[]", "DistilleryTrimmedLlamaForCausalLM"], plugin.stdout[-2000:]
        container.start(["serving", "serve"], log)
        wait_serving(container, address, "distillery.serving.v1.ServingService", log)

        chunks = asyncio.run(serving_generate(address, max_tokens=48, temperature=1.0))
        tokens = [t for c in chunks for t in c.token_ids]
        print(f"serving Generate on the restricted-head student: {len(tokens)} tokens, ids {sorted(set(tokens))[:12]}")
        assert {c.model_version for c in chunks} == {ckpt.version}
        # At temperature 1 a random model emits ids all over its vocabulary; the head holds only 0-2 and even ones.
        assert 0 < len(tokens) <= 48 and set(tokens) <= set(head), sorted(set(tokens) - set(head))
        assert container.stop() == 0, log.read_text()[-4000:]


def test_trainer_starts_with_the_registry_mounted(
    image: str, pod_volumes: dict, kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = pod_env("trainer", kafka_bootstrap)
    assert env["DISTILLERY_TRAINER_REGISTRY_DIR"] == "/registry"
    address = f"127.0.0.1:{env['DISTILLERY_TRAINER_GRPC_PORT']}"
    log = tmp_path / "trainer.log"
    registry = next(host for host, inside in pod_volumes.items() if inside == "/registry")
    with Container(image, pod_volumes, env, f"{UID}:{UID}") as container:
        container.start(["trainer", "serve"], log)
        wait_serving(container, address, "distillery.trainer.v1.TrainerService", log)
        assert container.stop() == 0, log.read_text()[-4000:]
    # Whatever the trainer wrote to the registry volume belongs to the pod's user.
    assert all(p.stat().st_uid == UID for p in registry.rglob("*")), list(registry.rglob("*"))
