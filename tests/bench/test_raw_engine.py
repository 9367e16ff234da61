"""The direct-engine driver of `distillery bench serving` on a real vLLM engine (tiny Llama), in a child process."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.bench.clients import child_pool
from services.bench.raw_engine import RawConfig, measure_raw
from services.bench.serving import ServingBenchConfig, service_env

pytestmark = pytest.mark.timeout(600)


def test_the_services_engine_driven_directly_reports_tokens_per_s(tiny_model_dir: Path, tmp_path: Path) -> None:
    bench = ServingBenchConfig(home=tmp_path, kv_cache_gib=0.25, max_num_seqs=16, enforce_eager=True)
    config = RawConfig(
        model_dir=tiny_model_dir,
        env=service_env(bench, tiny_model_dir),
        concurrencies=(1, 4),
        duration_s=2.0,
        max_tokens=16,
        temperature=0.0,
        prompts=[[("user", "Tom has 3 apples and buys 5 more. How many?")]],
    )
    with child_pool(1) as pool:
        result = pool.submit(measure_raw, config).result(timeout=500)
    assert [p["concurrency"] for p in result["probes"]] == [1, 4]
    for probe in result["probes"]:
        assert probe["tokens_per_s"] > 0 and probe["streams"] >= probe["concurrency"]
        assert probe["tokens_per_s_steady"] > 0 and 0 < probe["steady_from_s"] < 1.0
    assert result["engine_start_s"] > 0
