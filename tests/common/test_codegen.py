"""The committed stubs must be what `make protos` generates from protos/ now."""

from pathlib import Path

from services.common.codegen import GEN_DIR, generate


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    files = generate(tmp_path / "gen")
    fresh = {p.relative_to(tmp_path / "gen").as_posix(): p.read_bytes() for p in files}
    committed = {
        p.relative_to(GEN_DIR).as_posix(): p.read_bytes()
        for p in GEN_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(fresh) == sorted(committed), "stub files differ: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run `make protos`"


def test_contract_names() -> None:
    from services.common import pb

    assert pb.teacher.DESCRIPTOR.package == "distillery.teacher.v1"
    assert set(pb.teacher.DESCRIPTOR.services_by_name["TeacherService"].methods_by_name) >= {"Generate", "Score"}
    assert set(pb.trainer.DESCRIPTOR.services_by_name["TrainerService"].methods_by_name) >= {
        "StartRun", "GetRun", "WatchRun", "StopRun", "ListCheckpoints", "PromoteCheckpoint",
    }  # fmt: skip
    assert set(pb.serving.DESCRIPTOR.services_by_name["ServingService"].methods_by_name) >= {
        "Generate", "GetModel", "LoadModel",
    }  # fmt: skip
    assert pb.common.DESCRIPTOR.package == "distillery.common.v1"
