"""What the rendered manifests must guarantee beyond schema validity: hardening, wiring, and consistency."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from services.common.settings import KafkaSettings
from tests.deploy.conftest import DEPLOY
from tests.deploy.render import OVERLAYS, config_map, env_of, of_kind, one, render

SERVICES = {"teacher": (50051, 9101), "trainer": (50052, 9102), "serving": (50053, 9103)}
Objects = tuple[dict[str, Any], ...]


def deployments(kubectl: str, overlay: str) -> list[dict[str, Any]]:
    return list(of_kind(render(kubectl, f"overlays/{overlay}"), "Deployment"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened(kubectl: str, overlay: str) -> None:
    objects = render(kubectl, f"overlays/{overlay}")
    for account in of_kind(objects, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    for deployment in deployments(kubectl, overlay):
        name, pod = deployment["metadata"]["name"], deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == name
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] >= 10000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security.get("privileged", False) is False, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name} {kind}"
            # The only writable places: scratch space, caches, shared memory, local state (and the registry).
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            for path in ("/tmp", "/var/cache/distillery", "/var/lib/distillery", "/dev/shm"):
                assert mounts.get(path) in emptydirs, f"{name}: {path} is not an emptyDir"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_settings_agree(kubectl: str, overlay: str) -> None:
    objects = render(kubectl, f"overlays/{overlay}")
    for deployment in deployments(kubectl, overlay):
        name = deployment["metadata"]["name"]
        grpc_port, metrics_port = SERVICES[name]
        pod = deployment["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert container["args"] == [name, "serve"]
        env = env_of(objects, deployment)
        # With TLS on the gRPC port (the security component), probes use the plain-text health-only port.
        health = env.get("DISTILLERY_TLS_HEALTH_PORT")
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": metrics_port, **({"health": int(health)} if health else {})}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == (int(health) if health else grpc_port), f"{name} {probe}"
        if name in ("trainer", "teacher"):  # NOT_SERVING while Kafka is away must not restart them
            assert container["livenessProbe"]["grpc"]["service"] == "liveness"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
        prefix = f"DISTILLERY_{name.upper()}_"
        assert env[prefix + "HOST"] == "0.0.0.0"
        assert env[prefix + "GRPC_PORT"] == str(grpc_port)
        assert env[prefix + "METRICS_PORT"] == str(metrics_port)
        assert any(key.startswith("DISTILLERY_KAFKA_") for key in env), f"{name} gets no Kafka settings"
        # OpenMP threads follow the CPU limit (a quota is not an affinity).
        omp = {e["name"]: e for e in container["env"]}["OMP_NUM_THREADS"]
        assert omp["valueFrom"]["resourceFieldRef"] == {"containerName": name, "resource": "limits.cpu"}
        service = one(objects, "Service", name)
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": grpc_port, "metrics": metrics_port}
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_drain_fits_the_termination_grace(kubectl: str, overlay: str) -> None:
    """On SIGTERM a service drains for grace_period_s, then stops its engine: Kubernetes must not kill it first."""
    objects = render(kubectl, f"overlays/{overlay}")
    for deployment in deployments(kubectl, overlay):
        name = deployment["metadata"]["name"]
        drain = float(env_of(objects, deployment)[f"DISTILLERY_{name.upper()}_GRACE_PERIOD_S"])
        kill_after = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert drain + 10 <= kill_after, f"{name}: drain {drain} s leaves < 10 s of {kill_after} s for shutdown"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_registry_is_shared_read_write_by_the_trainer_only(kubectl: str, overlay: str) -> None:
    objects = render(kubectl, f"overlays/{overlay}")
    one(objects, "PersistentVolumeClaim", "registry")
    for deployment in deployments(kubectl, overlay):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        env = env_of(objects, deployment)
        if name == "teacher":
            assert not claims
            continue
        assert claims["registry"]["claimName"] == "registry"
        assert mounts["registry"]["mountPath"] == env[f"DISTILLERY_{name.upper()}_REGISTRY_DIR"]
        assert mounts["registry"].get("readOnly", False) is (name == "serving")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_names_cannot_inject_settings(kubectl: str, overlay: str) -> None:
    """Kubernetes injects <SERVICE>_PORT=tcp://... for every Service when service links are on: such names must
    never fall under a settings prefix (DISTILLERY_...)."""
    for service in of_kind(render(kubectl, f"overlays/{overlay}"), "Service"):
        injected = service["metadata"]["name"].upper().replace("-", "_") + "_"
        assert not injected.startswith("DISTILLERY_"), service["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_every_deployment(kubectl: str, overlay: str) -> None:
    objects = render(kubectl, f"overlays/{overlay}")
    budgets = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "PodDisruptionBudget")}
    for deployment in deployments(kubectl, overlay):
        name = deployment["metadata"]["name"]
        assert budgets[name]["selector"] == deployment["spec"]["selector"]
        # Never minAvailable equal to the replicas: that would block every node drain.
        assert budgets[name].get("maxUnavailable", 0) >= 1


def test_dev_runs_one_replica_of_everything_on_cpu(kubectl: str) -> None:
    objects = render(kubectl, "overlays/dev")
    assert not list(of_kind(objects, "HorizontalPodAutoscaler"))
    for deployment in of_kind(objects, "Deployment"):
        assert deployment["spec"]["replicas"] == 1
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["image"].endswith("-cpu") and "nvidia.com/gpu" not in container["resources"]["limits"]
    assert one(objects, "KafkaNodePool", "combined")["spec"]["replicas"] == 1


def test_prod_has_a_gpu_teacher_and_autoscaled_serving(kubectl: str) -> None:
    objects = render(kubectl, "overlays/prod")
    teacher = one(objects, "Deployment", "teacher")["spec"]["template"]["spec"]
    container = teacher["containers"][0]
    assert container["image"].endswith("-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in teacher["tolerations"]) and teacher["nodeSelector"]
    serving = one(objects, "Deployment", "serving")
    assert "replicas" not in serving["spec"], "the autoscaler owns serving's replica count"
    # KEDA owns serving's autoscaler there (tests/deploy/test_autoscaling.py), on the words-per-minute headroom.
    assert not list(of_kind(objects, "HorizontalPodAutoscaler"))
    scaled = one(objects, "ScaledObject", "serving")["spec"]
    assert scaled["scaleTargetRef"] == {"name": "serving"}  # KEDA's default kind: an apps/v1 Deployment
    assert 2 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    pool = one(objects, "KafkaNodePool", "combined")["spec"]
    assert pool["replicas"] >= 3 and pool["storage"]["volumes"][0]["type"] == "persistent-claim"


STRIMZI_OVERLAYS = [
    o for o in OVERLAYS if "components/strimzi" in (DEPLOY / "k8s" / "overlays" / o / "kustomization.yaml").read_text()
]


def test_strimzi_is_used() -> None:
    assert {"dev", "prod"} <= set(STRIMZI_OVERLAYS)


@pytest.mark.parametrize("overlay", STRIMZI_OVERLAYS)
def test_strimzi_topics_match_the_settings(kubectl: str, overlay: str) -> None:
    objects = render(kubectl, f"overlays/{overlay}")
    topics = list(of_kind(objects, "KafkaTopic"))
    kafka_env = config_map(objects, "kafka-config")
    settings = KafkaSettings()
    assert sorted(t["spec"]["topicName"] for t in topics) == sorted(settings.topics())
    (cluster,) = of_kind(objects, "Kafka")
    (pool,) = of_kind(objects, "KafkaNodePool")
    assert kafka_env["DISTILLERY_KAFKA_BOOTSTRAP"] == f"{cluster['metadata']['name']}-kafka-bootstrap:9092"
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == cluster["metadata"]["name"]
    assert {"controller", "broker"} <= set(pool["spec"]["roles"]), "KRaft: the pool must hold the controllers"
    brokers = pool["spec"]["replicas"]
    config = cluster["spec"]["kafka"]["config"]
    for topic in topics:
        spec = topic["spec"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster["metadata"]["name"]
        # The services create missing topics themselves with these settings: both ways must agree.
        assert spec["partitions"] == int(kafka_env["DISTILLERY_KAFKA_PARTITIONS"])
        assert spec["replicas"] == int(kafka_env["DISTILLERY_KAFKA_REPLICATION_FACTOR"]) <= brokers
        assert spec["config"]["min.insync.replicas"] <= max(1, spec["replicas"] - 1)
    assert config["default.replication.factor"] <= brokers
    assert config["offsets.topic.replication.factor"] <= brokers


def test_monitoring_selects_the_services_and_carries_the_rules(kubectl: str) -> None:
    objects = render(kubectl, "overlays/prod")
    (monitor,) = of_kind(objects, "ServiceMonitor")
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    scraped = [
        s
        for s in of_kind(objects, "Service")
        if s["metadata"]["labels"].get(expression["key"]) in expression["values"]
        and any(p["name"] == monitor["spec"]["endpoints"][0]["port"] for p in s["spec"]["ports"])
    ]
    assert sorted(s["metadata"]["name"] for s in scraped) == ["serving", "teacher", "trainer"]
    (rule,) = of_kind(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    dashboard = one(objects, "ConfigMap", "distillery-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["distillery.json"] == (DEPLOY / "grafana" / "distillery.json").read_text()
