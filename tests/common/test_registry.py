"""The model registry: atomic immutable checkpoints, verification refuses corrupt or unsafe ones."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.common.registry import CheckpointError, Registry, path_from_uri, verify


def _stage(registry: Registry, scale: float = 1.0) -> Path:
    staged = registry.staging_dir()
    save_file({"w": torch.ones(4, 4) * scale}, str(staged / "model.safetensors"))
    (staged / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return staged


def _write(registry: Registry, run_id: str = "run-a", step: int = 10):
    return registry.write(
        _stage(registry), run_id=run_id, step=step, parameter_count=16, metrics={"accuracy": 0.5},
        kafka_offsets={"samples": {"0": 12, "1": 7}},
    )  # fmt: skip


def test_write_verify_and_versions(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    first, second = _write(registry), _write(registry, "run-b")
    assert (first.version, second.version) == (1, 2)
    assert first.path.name.startswith("00000001-")
    checked = verify(first.path)
    assert checked.manifest.kafka_offsets == {"samples": {"0": 12, "1": 7}}
    assert checked.manifest_sha256 == first.manifest_sha256
    assert path_from_uri(first.uri) == first.path
    assert [c.version for c in registry.checkpoints()] == [1, 2]
    assert registry.latest("run-a").version == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def test_checkpoints_are_readable_by_other_users(tmp_path: Path) -> None:
    """safetensors writes 0600; the trainer and the serving service may run as different users."""
    staged = _stage(Registry(tmp_path))
    (staged / "model.safetensors").chmod(0o600)
    (staged / "sub").mkdir(mode=0o700)
    (staged / "sub" / "state.safetensors").write_bytes((staged / "model.safetensors").read_bytes())
    ckpt = Registry(tmp_path).write(staged, run_id="r", step=1, parameter_count=16)
    modes = {p.relative_to(ckpt.path).as_posix(): p.stat().st_mode & 0o777 for p in ckpt.path.rglob("*")}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644, "sub": 0o755,
                     "sub/state.safetensors": 0o644, "manifest.json": 0o644}  # fmt: skip
    assert ckpt.path.stat().st_mode & 0o777 == 0o755


def test_promotions(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    a, b = _write(registry), _write(registry)
    assert registry.latest_promoted() is None
    registry.promote(a)
    registry.promote(b)
    assert registry.latest_promoted().version == b.version
    assert registry.promoted_versions() == [1, 2]


def test_wrong_sha256_is_refused(tmp_path: Path) -> None:
    ckpt = _write(Registry(tmp_path))
    save_file({"w": torch.zeros(4, 4)}, str(ckpt.path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"sha256 of model\.safetensors"):
        verify(ckpt.path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    ckpt = _write(Registry(tmp_path))
    (ckpt.path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is listed in the manifest but missing"):
        verify(ckpt.path)


def test_pickle_is_refused(tmp_path: Path) -> None:
    ckpt = _write(Registry(tmp_path))
    (ckpt.path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": [1, 2]}))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is not safetensors"):
        verify(ckpt.path)


def test_pickle_listed_in_manifest_is_refused(tmp_path: Path) -> None:
    ckpt = _write(Registry(tmp_path))
    manifest = json.loads((ckpt.path / "manifest.json").read_text())
    (ckpt.path / "model.safetensors").unlink()
    (ckpt.path / "model.pt").write_bytes(b"\x80\x04K\x01.")
    manifest["files"] = {"model.pt": {"sha256": "x", "bytes": 5}, "config.json": manifest["files"]["config.json"]}
    (ckpt.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not safetensors"):
        verify(ckpt.path)


def test_remote_code_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    staged = _stage(registry)
    (staged / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "evil.Model"}}))
    ckpt = registry.write(staged, run_id="r", step=1, parameter_count=16)
    with pytest.raises(CheckpointError, match="remote code"):
        verify(ckpt.path)


def test_registering_pickle_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    staged = _stage(registry)
    (staged / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt"):
        registry.write(staged, run_id="r", step=1, parameter_count=16)


def test_concurrent_writers_get_distinct_versions(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    registry = Registry(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda _: _write(registry).version, range(8)))
    assert sorted(versions) == list(range(1, 9))


def test_readers_work_on_a_read_only_empty_registry(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        registry = Registry(root)
        assert registry.checkpoints() == []
        assert registry.latest_promoted() is None
        assert registry.promoted_versions() == []
        assert list(root.iterdir()) == []
    finally:
        root.chmod(0o755)
