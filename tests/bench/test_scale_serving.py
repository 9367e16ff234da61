"""The scale benchmark's serving measurement: the core split (unit) and a short run of two tiny replicas (e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.bench.scale_serving import ScaleServingConfig, core_split, measure_serving_async


def test_core_split_gives_each_replica_its_own_cores() -> None:
    assert core_split([0, 1], 1) == [[0, 1]]
    assert core_split([0, 1], 2) == [[0], [1]]
    assert core_split([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert core_split([0, 1], 3) == [[0, 1]] * 3  # more replicas than cores: they share


@pytest.mark.e2e
@pytest.mark.timeout(900)
async def test_two_tiny_replicas_share_the_load(tmp_path: Path) -> None:
    config = ScaleServingConfig(
        n_replicas=2, home=tmp_path, student="tiny", streams_per_replica=4, duration_s=8, warmup_s=2, max_tokens=32,
        temperature=1.0,
    )  # fmt: skip
    result = await measure_serving_async(config)
    assert result["failed_requests"] == 0, result["errors"]
    assert result["tokens_per_s"] > 0 and 0 < result["itl_ms_p50"] <= result["itl_ms_p95"]
    assert all(n > 0 for n in result["completed_streams_by_replica"]), result
    assert result["cores_by_replica"] == [1, 1] or result["cores"] != 2
