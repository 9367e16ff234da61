"""The registry is the only source of models: references resolve inside its root, manifests stay in their folder,
and refusals say nothing about other paths (issue: hostile callers)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.common.registry import (
    MANIFEST,
    NOT_OURS,
    Checkpoint,
    CheckpointError,
    NotInRegistry,
    Registry,
    path_from_uri,
    verify,
)


def _write(registry: Registry, run_id: str = "run-a") -> Checkpoint:
    staged = registry.staging_dir()
    save_file({"w": torch.ones(4, 4)}, str(staged / "model.safetensors"))
    (staged / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return registry.write(staged, run_id=run_id, step=1, parameter_count=16)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def test_a_checkpoint_is_found_by_id_uri_path_and_version(registry: Registry) -> None:
    ckpt = _write(registry)
    for ref in (ckpt.path.name, ckpt.uri, str(ckpt.path), f"file://localhost{ckpt.path}"):
        assert registry.locate(ref) == ckpt.path
    assert registry.find(version=ckpt.version, run_id="run-a") == ckpt.path
    assert registry.find(checkpoint_id=ckpt.path.name) == ckpt.path
    with pytest.raises(NotInRegistry, match=NOT_OURS):
        registry.find(version=ckpt.version, run_id="someone-else")
    with pytest.raises(NotInRegistry, match=NOT_OURS):
        registry.find(version=999)
    with pytest.raises(CheckpointError, match="name one checkpoint"):
        registry.find(version=ckpt.version, uri=ckpt.uri)


def test_a_valid_checkpoint_copied_outside_the_registry_is_refused(registry: Registry, tmp_path: Path) -> None:
    ckpt = _write(registry)
    outside = tmp_path / "elsewhere" / ckpt.path.name
    shutil.copytree(ckpt.path, outside)
    verify(outside)  # a perfectly good checkpoint: refused only because of where it is
    for ref in (str(outside), outside.as_uri(), str(tmp_path), "/", "/etc", str(registry.root),
                str(registry.root / "checkpoints"), str(registry.root / "promotions"), "checkpoints/" + ckpt.path.name,
                str(ckpt.path / ".."), str(ckpt.path / MANIFEST)):  # fmt: skip
        with pytest.raises(NotInRegistry) as err:
            registry.locate(ref)
        assert str(err.value).endswith(NOT_OURS), ref


def test_missing_and_manifestless_folders_outside_get_the_same_words(registry: Registry, tmp_path: Path) -> None:
    """NOT_FOUND vs "has no manifest.json" used to tell a caller which folders exist."""
    (tmp_path / "exists").mkdir()
    messages = set()
    for ref in (str(tmp_path / "exists"), str(tmp_path / "missing")):
        with pytest.raises(NotInRegistry) as err:
            registry.locate(ref)
        messages.add(str(err.value).replace(ref, "REF"))
    assert messages == {f"registry_uri='REF': {NOT_OURS}"}


def test_file_uris_naming_a_host_are_refused(registry: Registry) -> None:
    with pytest.raises(CheckpointError, match="must not name a host"):
        path_from_uri("file://host/etc")
    with pytest.raises(CheckpointError, match="must not name a host"):
        registry.locate("file://evil.example/etc")
    with pytest.raises(CheckpointError, match="only file://"):
        registry.locate("http://127.0.0.1/ckpt")


def test_symlinks_out_of_the_registry_are_refused(registry: Registry, tmp_path: Path) -> None:
    ckpt = _write(registry)
    outside = tmp_path / "outside"
    shutil.copytree(ckpt.path, outside)
    link = registry.root / "checkpoints" / "00000099-0123456789abcdef"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(NotInRegistry, match=NOT_OURS):
        registry.locate(link.name)
    # A symlink from outside into the registry resolves to the real checkpoint: it is the registry's own.
    (tmp_path / "into").symlink_to(ckpt.path, target_is_directory=True)
    assert registry.locate(str(tmp_path / "into")) == ckpt.path


def test_a_symlinked_file_inside_a_checkpoint_is_refused(registry: Registry, tmp_path: Path) -> None:
    ckpt = _write(registry)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    (ckpt.path / "config.json").unlink()
    (ckpt.path / "config.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="symbolic links") as err:
        verify(registry.locate(ckpt.path.name))
    assert str(tmp_path) not in str(err.value)


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "a/../../x", "./model.safetensors",
                                  "", "a\\b", "sub//x"])  # fmt: skip
def test_manifest_names_must_stay_in_the_folder(registry: Registry, tmp_path: Path, name: str) -> None:
    """A manifest naming ../../etc/hostname made the error reveal that file's size and sha256."""
    ckpt = _write(registry)
    target = tmp_path / "hostname"
    target.write_text("secret-host\n")
    manifest = json.loads((ckpt.path / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    (ckpt.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="only names inside the folder") as err:
        verify(ckpt.path)
    message = str(err.value)
    assert hashlib.sha256(target.read_bytes()).hexdigest() not in message and "12 bytes" not in message


def test_manifests_that_are_not_objects_are_refused(registry: Registry) -> None:
    ckpt = _write(registry)
    for bad in ("[]", '"x"', json.dumps({"format": "distillery.checkpoint.v1", "files": []})):
        (ckpt.path / MANIFEST).write_text(bad)
        with pytest.raises(CheckpointError):
            verify(ckpt.path)


def test_refusals_quote_at_most_a_little_of_a_huge_reference(registry: Registry) -> None:
    with pytest.raises(NotInRegistry) as err:
        registry.locate("/" + "a" * 2_000_000)
    assert len(str(err.value)) < 300
