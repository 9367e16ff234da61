"""Serving's autoscaler: KEDA's ScaledObject (components/keda) scales on the words-per-minute headroom every replica
exports. The manifests are checked as rendered; the trigger's query is evaluated by a real Prometheus on synthetic
replicas (known values, known answer) and on the real serving service."""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY
from tests.deploy.metrics import contract_sample_names, metric_names
from tests.deploy.prometheus_server import PrometheusServer
from tests.deploy.render import OVERLAYS, of_kind, one, render

COMPONENT = DEPLOY / "k8s" / "components" / "keda"


def trigger(scaled_object: dict[str, Any]) -> dict[str, Any]:
    (only,) = scaled_object["spec"]["triggers"]
    assert only["type"] == "prometheus" and only["metricType"] == "AverageValue"
    return only


def component_query(namespace: str = "distillery") -> str:
    query: str = trigger(yaml.safe_load((COMPONENT / "scaledobject.yaml").read_text()))["metadata"]["query"]
    return query.replace('namespace="distillery"', f'namespace="{namespace}"')


def test_keda_replaces_the_cpu_autoscaler_with_the_same_behaviour(kubectl: str) -> None:
    base = one(render(kubectl, "base"), "HorizontalPodAutoscaler", "serving")["spec"]
    prod = render(kubectl, "overlays/prod")
    assert not list(of_kind(prod, "HorizontalPodAutoscaler")), "two autoscalers would fight over serving"
    spec = one(prod, "ScaledObject", "serving")["spec"]
    assert spec["scaleTargetRef"] == {"name": "serving"}
    assert one(prod, "Deployment", "serving")["spec"].get("replicas") is None
    hpa = spec["advanced"]["horizontalPodAutoscalerConfig"]
    assert hpa["behavior"] == base["behavior"]
    assert 2 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    metadata = trigger(one(prod, "ScaledObject", "serving"))["metadata"]
    assert metadata["ignoreNullValues"] == "false"  # no data is the fallback, never a scale-down to the minimum
    assert 0 < float(metadata["threshold"]) < 1  # 1/headroom below 1: streams faster than readers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_query_selects_the_overlays_own_serving_replicas(kubectl: str, overlay: str) -> None:
    for scaled in of_kind(render(kubectl, f"overlays/{overlay}"), "ScaledObject"):
        query = trigger(scaled)["metadata"]["query"]
        assert f'namespace="{scaled["metadata"]["namespace"]}"' in query, f"{overlay}: {query}"
        assert 'job="serving"' in query


def test_the_query_uses_only_metrics_the_services_export() -> None:
    names = metric_names(component_query())
    assert names == {"distillery_serving_wpm_headroom_ratio"}
    assert names <= contract_sample_names()


#: Headroom of four synthetic replicas: streams at half reading speed, at 1.25x, stalled (clamped to 0.25), idle.
REPLICAS = {"slow": 0.5, "ok": 1.25, "stalled": 0.0, "idle": math.inf}


@pytest.mark.e2e
def test_prometheus_evaluates_the_trigger_query(prometheus_bin: str, tmp_path: Path) -> None:
    """KEDA's AverageValue rule: desired replicas = ceil(query / threshold). Here 1/0.5 + 1/1.25 + 1/0.25 + 0 = 6.8,
    so 0.8 asks for 9 replicas; a NaN replica (a scrape of a broken exporter) must not turn the sum into NaN."""
    with ExitStack() as stack:
        from tests.deploy.exporters import headroom_exporter

        targets = [stack.enter_context(headroom_exporter(v)) for v in [*REPLICAS.values(), math.nan]]
        prom = stack.enter_context(
            PrometheusServer(prometheus_bin, tmp_path, jobs={"serving": targets}, labels={"namespace": "distillery"})
        )
        prom.wait_for(lambda: prom.query('count(up{job="serving"} == 1)'),
                      lambda r: bool(r) and r[0]["value"][1] == str(len(targets)), timeout=60)  # fmt: skip
        result = prom.query(component_query())
    (sample,) = result
    value = float(sample["value"][1])
    assert value == pytest.approx(1 / 0.5 + 1 / 1.25 + 1 / 0.25 + 0)
    threshold = float(trigger(yaml.safe_load((COMPONENT / "scaledobject.yaml").read_text()))["metadata"]["threshold"])
    assert math.ceil(value / threshold) == 9


@pytest.mark.e2e
def test_prometheus_evaluates_the_trigger_query_on_the_real_service(live, prometheus_bin: str, tmp_path: Path) -> None:
    """The real serving service, idle and then under streams: one finite value, 0 when idle, above 0 under load.

    A stream counts in the gauge only once it has been open for the grace period and a sweep and a scrape have
    both happened since; the tiny model ends a stream of 600 tokens in 1-3 s, so waves of streams keep coming
    until Prometheus has seen one (a fixed burst could fall between scrapes)."""
    import threading

    from tests.deploy.live import serve_streams

    address = live.processes["serving"].address
    target = live.metrics_target("serving")
    seen = threading.Event()

    def waves() -> None:
        while not seen.is_set():
            serve_streams(address, 32, 32, 600)

    with PrometheusServer(prometheus_bin, tmp_path, jobs={"serving": [target]}, labels={"namespace": "ns"}) as prom:
        query = component_query("ns")
        idle = prom.wait_for(lambda: prom.query(query), bool, timeout=60)
        assert float(idle[0]["value"][1]) == 0.0
        streams = threading.Thread(target=waves, daemon=True)
        streams.start()
        try:
            busy = prom.wait_for(lambda: prom.query(query), lambda r: bool(r) and float(r[0]["value"][1]) > 0, 120)
        finally:
            seen.set()
            streams.join(300)
        assert 0 < float(busy[0]["value"][1]) < math.inf
