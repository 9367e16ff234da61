"""Generates the protobuf + gRPC stubs (with mypy `.pyi`) from protos/ into services/common/gen/.

Run by `make protos`; tests/common/test_codegen.py regenerates into a temporary folder and fails when
the committed stubs differ. Generated modules import each other as `distillery.<svc>.v1`; we rewrite
those imports to the package path they live at, so no `sys.path` tricks are needed.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
GEN_DIR = ROOT / "services" / "common" / "gen"
GEN_PACKAGE = "services.common.gen"

_PY_IMPORT = re.compile(r"^(from|import) distillery\.", re.MULTILINE)
_PYI_REF = re.compile(r"\bdistillery\.(\w+)\.v1\.(\w+_pb2(?:_grpc)?)\b")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def _rewrite(path: Path) -> None:
    text = path.read_text()
    text = _PY_IMPORT.sub(rf"\1 {GEN_PACKAGE}.distillery.", text)
    if path.suffix == ".pyi":
        text = _PYI_REF.sub(rf"{GEN_PACKAGE}.distillery.\1.v1.\2", text)
    path.write_text(text)


def generate(out_dir: Path) -> list[Path]:
    """Generates every stub into `out_dir` (created, emptied first) and returns the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    plugin_dir = Path(sys.executable).parent
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_DIR)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    for path in out_dir.rglob("*"):
        if path.suffix in (".py", ".pyi"):
            _rewrite(path)
    for folder in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp) / "gen")
        if GEN_DIR.exists():
            shutil.rmtree(GEN_DIR)
        shutil.copytree(Path(tmp) / "gen", GEN_DIR)
    print(f"generated {len(files)} files into {GEN_DIR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
