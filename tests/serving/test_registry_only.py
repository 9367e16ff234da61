"""LoadModel and promotion events name checkpoints of the service's registry, nothing else (no engine starts: every
hostile reference is refused before a load)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common import pb
from services.common.registry import NOT_OURS, Checkpoint, Registry
from services.serving import metrics
from services.serving.settings import ServingSettings


def _register(registry: Registry, source: Path, run_id: str = "run") -> Checkpoint:
    staged = registry.staging_dir()
    for file in source.iterdir():
        shutil.copy(file, staged / file.name)
    return registry.write(staged, run_id=run_id, step=1, parameter_count=1)


async def _no_engine(path: Path) -> Any:
    raise AssertionError(f"an engine was started for {path}: the reference should have been refused")


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Any]:
    from services.serving.main import ServingApp

    app = ServingApp(ServingSettings(home=tmp_path / "home", grpc_port=0, watch_checkpoints=False), _no_engine)
    await app.start(metrics_server=False)
    yield app
    await app.stop()


async def _load(app: Any, **fields: Any) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = pb.serving_grpc.ServingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LoadModel(pb.serving.LoadModelRequest(**fields))
    return err.value.code(), err.value.details() or ""


async def test_load_model_refuses_anything_outside_the_registry(app: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    ckpt = _register(app.registry, tiny_model_dir)
    outside = tmp_path / "copied" / ckpt.path.name
    shutil.copytree(ckpt.path, outside)  # a good checkpoint, in the wrong place
    (tmp_path / "empty").mkdir()
    link = app.registry.root / "checkpoints" / "00000099-0123456789abcdef"
    link.symlink_to(outside, target_is_directory=True)
    refused = {}
    for ref in (str(outside), outside.as_uri(), "/etc", str(tmp_path / "empty"), str(tmp_path / "missing"),
                str(link), link.name, str(app.registry.root)):  # fmt: skip
        code, details = await _load(app, registry_uri=ref)
        refused[ref] = (code, details.replace(ref, "REF"))
    assert set(refused.values()) == {(grpc.StatusCode.NOT_FOUND, f"registry_uri='REF': {NOT_OURS}")}, refused
    code, details = await _load(app, registry_uri="file://host/etc")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must not name a host" in details
    code, details = await _load(app, version=ckpt.version, run_id="not-its-run")
    assert code == grpc.StatusCode.NOT_FOUND and NOT_OURS in details
    code, details = await _load(app, version=ckpt.version, registry_uri=ckpt.uri)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "name one checkpoint" in details
    code, details = await _load(app)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert app.holder.model is None


async def test_promotion_events_from_kafka_are_confined_too(app: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    ckpt = _register(app.registry, tiny_model_dir)
    outside = tmp_path / "copied" / "weights"
    shutil.copytree(ckpt.path, outside)
    failed = metrics.SWAPS.labels("failed")._value.get()
    for uri in (outside.as_uri(), "file://host/etc", "/etc", str(tmp_path)):
        event = pb.common.CheckpointEvent(run_id="run", version=ckpt.version + 1, registry_uri=uri, promoted=True)
        why = await app.handle_event(event)  # refused and counted; no engine was asked to load it
        assert why is not None and why.startswith(f"checkpoint version {event.version} refused: "), why
    assert metrics.SWAPS.labels("failed")._value.get() == failed + 4
    assert app.holder.model is None
