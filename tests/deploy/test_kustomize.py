"""Every overlay renders with kubectl's kustomize, and every object it renders validates against a schema."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import DEPLOY
from tests.deploy.crd_schemas import SCHEMAS
from tests.deploy.render import OVERLAYS, config_map, of_kind, render

#: Oldest Kubernetes the manifests claim (grpc probes GA in 1.27, PDB unhealthyPodEvictionPolicy in 1.27+),
#: and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def test_there_are_the_documented_overlays() -> None:
    assert set(OVERLAYS) >= {"dev", "prod", "external-kafka"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(kubectl: str, overlay: str) -> None:
    objects = render(kubectl, f"overlays/{overlay}")
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PersistentVolumeClaim"} <= kinds
    assert {d["metadata"]["name"] for d in of_kind(objects, "Deployment")} == {"teacher", "trainer", "serving"}
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, f"{overlay}: objects outside one namespace: {namespaces}"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates(kubectl: str, overlay: str, version: str) -> None:
    custom = []
    for obj in render(kubectl, f"overlays/{overlay}"):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            schema = SCHEMAS.get((obj["apiVersion"], obj["kind"]))
            assert schema is not None, f"{overlay}: no schema for {obj['apiVersion']} {name}"
            jsonschema.validate(obj, schema)
            custom.append(name)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {name} is invalid for Kubernetes {version}: {e.message} at {list(e.path)}")
    if overlay == "prod":
        assert any(n.startswith("Kafka/") for n in custom) and any(n.startswith("PrometheusRule/") for n in custom)


def test_crd_schemas_reject_typos() -> None:
    """The custom-resource schemas are strict enough to catch a misspelt field."""
    topic = {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaTopic",
        "metadata": {"name": "t"},
        "spec": {"partitions": 4, "replica": 3},
    }
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        jsonschema.validate(topic, SCHEMAS[("kafka.strimzi.io/v1beta2", "KafkaTopic")])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_points_at_kafka(kubectl: str, overlay: str) -> None:
    kafka = config_map(render(kubectl, f"overlays/{overlay}"), "kafka-config")
    assert kafka.get("DISTILLERY_KAFKA_BOOTSTRAP"), f"{overlay} leaves DISTILLERY_KAFKA_BOOTSTRAP unset"


COMPONENTS = {
    **{p.name: p for p in sorted((DEPLOY / "k8s" / "components").iterdir()) if p.is_dir()},
    "grafana": DEPLOY / "grafana",
}


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_component_renders_on_the_base_alone(kubectl: str, component: str, tmp_path: Path) -> None:
    """Each component stands alone (an overlay can pick any subset): it renders over the base by itself."""
    path = COMPONENTS[component]
    assert yaml.safe_load((path / "kustomization.yaml").read_text())["kind"] == "Component"
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY / "k8s" / "base", tmp_path)],
                "components": [os.path.relpath(path, tmp_path)],
            }
        )
    )
    result = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"} == {"teacher", "trainer", "serving"}
