"""Renders the kustomize overlays with kubectl (once per session) and finds objects in the result."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Iterator
from typing import Any

import yaml

from tests.deploy.conftest import DEPLOY

K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


@functools.cache
def render(kubectl: str, path: str) -> tuple[dict[str, Any], ...]:
    """Objects `kubectl kustomize <path>` renders (path relative to deploy/k8s)."""
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> Iterator[dict[str, Any]]:
    return (o for o in objects if o["kind"] == kind)


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def config_map(objects: tuple[dict[str, Any], ...], prefix: str) -> dict[str, str]:
    """Data of the generated ConfigMap whose name (before kustomize's hash suffix) is `prefix`."""
    found = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].rsplit("-", 1)[0] == prefix]
    assert len(found) == 1, f"expected one ConfigMap {prefix}-<hash>, found {[o['metadata']['name'] for o in found]}"
    return dict(found[0].get("data", {}))


def env_of(objects: tuple[dict[str, Any], ...], deployment: dict[str, Any]) -> dict[str, str]:
    """Environment the first container gets from its ConfigMaps (envFrom), later sources winning."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    names = {o["metadata"]["name"]: o for o in of_kind(objects, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in names, f"{deployment['metadata']['name']} reads ConfigMap {ref}, which is not rendered"
        env.update(names[ref].get("data", {}))
    return env
