"""The model registry: a folder of immutable, content-addressed checkpoints with verified manifests.

    <registry>/checkpoints/<version:08d>-<manifest sha256[:16]>/
        model.safetensors  config.json  tokenizer.json  ...  manifest.json
    <registry>/versions/<n>              registry-wide version counter (one empty folder per version)
    <registry>/promotions/<version>.json which checkpoints were promoted (mutable state lives outside them)

A checkpoint is written into `<registry>/tmp/`, hashed, and renamed into place, so readers never see a half
written one. `verify` refuses anything the manifest does not vouch for: a wrong sha256, a missing or extra
file, a name that leaves the folder or a symbolic link, any weights that are not safetensors (pickle is never
loaded), or a config asking for remote code. `Registry.locate` is the only way a caller's reference (a version, a
checkpoint id, a URI) becomes a folder: whatever it names must resolve inside `<registry>/checkpoints/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from services.common.text import clip

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "distillery.checkpoint.v1"
#: Weight formats that can execute code when loaded: never accepted.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".h5", ".msgpack")


#: What a caller learns about a reference that is not one of this registry's checkpoints: the same words whether
#: the path is missing, outside the registry, or an existing folder without a manifest (nothing else leaks).
NOT_OURS = "not a checkpoint of this registry"
CHECKPOINT_ID_RE = re.compile(r"^[0-9]{8}-[0-9a-f]{16}$")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or unsafe."""


class NotInRegistry(CheckpointError):
    """A reference that does not name a checkpoint folder of this registry (missing, elsewhere, or malformed)."""

    def __init__(self, field: str, value: object) -> None:
        super().__init__(f"{field}={clip(value)}: {NOT_OURS}")
        self.field = field


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def readable_by_all(folder: Path) -> None:
    """Files 0644, folders 0755. safetensors writes weights 0600, and a model folder is written by one user (the
    image build runs as root, the trainer as its pod's user) and read by another (services run as uid 10001)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def path_from_uri(uri: str, field: str = "registry_uri") -> Path:
    """`file:///x/y` (or `file://localhost/x/y`) or a plain path → Path. A URI naming another host is refused:
    `file://host/etc` must never be read as the local `/etc`."""
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise CheckpointError(f"{field}={clip(uri)}: a file:// URI must not name a host")
        return Path(unquote(parsed.path))
    if "://" in uri:
        raise CheckpointError(f"{field}={clip(uri)}: only file:// URIs and paths are supported")
    return Path(uri)


def checkpoint_id_of(uri: str) -> str:
    """The checkpoint id a URI ends in (`…/checkpoints/00000007-3f2a…` → `00000007-3f2a…`), else `uri` unchanged
    (which `Registry.locate` then refuses). Announced checkpoints are looked up by id in the reader's own registry:
    the volume may be mounted at another path there, and nothing outside it can be named."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name if CHECKPOINT_ID_RE.fullmatch(name) else uri


def plain_name(name: object) -> bool:
    """A manifest entry: a relative POSIX path of plain parts (no '..', '.', empty part, backslash or NUL)."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def uri_for(path: Path) -> str:
    return path.resolve().as_uri()


@dataclass
class Manifest:
    version: int
    run_id: str
    step: int
    files: dict[str, dict[str, Any]]
    parameter_count: int
    metrics: dict[str, float] = field(default_factory=dict)
    teacher: dict[str, str] = field(default_factory=dict)
    run_spec: dict[str, Any] = field(default_factory=dict)
    kafka_offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    created_at: float = 0.0
    format: str = MANIFEST_FORMAT

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data, Mapping) or data.get("format") != MANIFEST_FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise CheckpointError(f"manifest format={clip(got)} is not {MANIFEST_FORMAT!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Checkpoint:
    path: Path
    manifest: Manifest
    manifest_sha256: str

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def uri(self) -> str:
        return uri_for(self.path)


def verify(path: Path) -> Checkpoint:
    """Checks a checkpoint folder against its manifest; raises CheckpointError saying what is wrong.

    Messages name the folder by its own name and only ever describe files inside it."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path.name} does not exist")
    manifest_path = path / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path.name} has no {MANIFEST}")
    raw = manifest_path.read_bytes()
    try:
        manifest = Manifest.from_json(json.loads(raw))
        if not isinstance(manifest.files, dict) or not all(isinstance(m, dict) for m in manifest.files.values()):
            raise TypeError("files must map names to {sha256, bytes}")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path.name}: unreadable manifest: {clip(exc)}") from exc
    for name in sorted(manifest.files):
        if not plain_name(name):
            raise CheckpointError(f"{path.name}: manifest names {clip(name)}; only names inside the folder are allowed")
    links = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_symlink())
    if links:
        raise CheckpointError(f"{path.name}: {clip(links)} are symbolic links; a checkpoint holds regular files only")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    for name in sorted(present):
        if name.endswith(UNSAFE_SUFFIXES):
            raise CheckpointError(f"{path.name}: {name} is not safetensors; only safetensors weights are loaded")
    extra = present - set(manifest.files)
    if extra:
        raise CheckpointError(f"{path.name}: files not in the manifest: {clip(sorted(extra))}")
    if not any(name.endswith(".safetensors") for name in manifest.files):
        raise CheckpointError(f"{path.name}: the manifest lists no .safetensors weights")
    for name, meta in manifest.files.items():
        if name.endswith(UNSAFE_SUFFIXES):
            raise CheckpointError(f"{path.name}: manifest lists {name}, which is not safetensors")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path.name}: {name} is listed in the manifest but missing")
        if file.stat().st_size != meta.get("bytes"):
            raise CheckpointError(
                f"{path.name}: {name} is {file.stat().st_size} bytes, manifest says {meta.get('bytes')}"
            )
        actual = sha256_file(file)
        if actual != meta.get("sha256"):
            raise CheckpointError(f"{path.name}: sha256 of {name} is {actual}, manifest says {meta.get('sha256')}")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if "auto_map" in config:
        raise CheckpointError(f"{path.name}: config.json asks for remote code (auto_map); refused")
    return Checkpoint(path=path, manifest=manifest, manifest_sha256=hashlib.sha256(raw).hexdigest())


class Registry:
    """A registry rooted at a folder (a volume shared by trainer and serving in Kubernetes).

    Folders are created when something is written, so readers work on a read-only mount of an empty volume.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _next_version(self) -> int:
        """Allocates a registry-wide version; `mkdir` is atomic, so concurrent writers never share one."""
        taken = [int(p.name) for p in self._folder("versions").iterdir() if p.name.isdigit()]
        candidate = max(taken, default=0) + 1
        while True:
            try:
                (self.root / "versions" / str(candidate)).mkdir()
                return candidate
            except FileExistsError:
                candidate += 1

    def write(self, staged: Path, *, run_id: str, step: int, parameter_count: int,
              metrics: Mapping[str, float] | None = None, teacher: Mapping[str, str] | None = None,
              run_spec: Mapping[str, Any] | None = None,
              kafka_offsets: Mapping[str, Mapping[str, int]] | None = None) -> Checkpoint:  # fmt: skip
        """Moves a folder of model files into the registry as a new immutable checkpoint and returns it.

        `staged` must be inside `<registry>/tmp` (use `staging_dir()`), so the final rename is atomic.
        """
        if staged.resolve().parent != self.root / "tmp":
            raise ValueError(f"staged={staged}: write it under {self.root / 'tmp'} (use staging_dir())")
        files = {}
        for file in sorted(p for p in staged.rglob("*") if p.is_file()):
            name = file.relative_to(staged).as_posix()
            if name == MANIFEST or name.endswith(UNSAFE_SUFFIXES):
                raise CheckpointError(f"refusing to register {name}: only safetensors weights and metadata")
            files[name] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
        version = self._next_version()
        manifest = Manifest(
            version=version, run_id=run_id, step=step, files=files, parameter_count=parameter_count,
            metrics=dict(metrics or {}), teacher=dict(teacher or {}), run_spec=dict(run_spec or {}),
            kafka_offsets={t: dict(p) for t, p in (kafka_offsets or {}).items()}, created_at=time.time(),
        )  # fmt: skip
        raw = json.dumps(manifest.__dict__, indent=2, sort_keys=True).encode()
        (staged / MANIFEST).write_bytes(raw)
        readable_by_all(staged)
        for file in staged.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        digest = hashlib.sha256(raw).hexdigest()
        final = self._folder("checkpoints") / f"{version:08d}-{digest[:16]}"
        os.rename(staged, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return Checkpoint(path=final, manifest=manifest, manifest_sha256=digest)

    def staging_dir(self) -> Path:
        path = self._folder("tmp") / uuid.uuid4().hex
        path.mkdir()
        return path

    def discard_staging(self) -> None:
        """Removes half-written checkpoints left by a writer that died."""
        if not (self.root / "tmp").is_dir():
            return
        for path in (self.root / "tmp").iterdir():
            shutil.rmtree(path, ignore_errors=True)

    def checkpoints(self, run_id: str | None = None) -> list[Checkpoint]:
        """Every readable checkpoint (oldest first); unreadable manifests are skipped, not verified here."""
        out: list[Checkpoint] = []
        if not (self.root / "checkpoints").is_dir():
            return out
        for path in sorted((self.root / "checkpoints").iterdir()):
            try:
                raw = (path / MANIFEST).read_bytes()
                manifest = Manifest.from_json(json.loads(raw))
            except (OSError, ValueError, TypeError):
                continue
            if run_id is None or manifest.run_id == run_id:
                out.append(Checkpoint(path, manifest, hashlib.sha256(raw).hexdigest()))
        return out

    def get(self, version: int) -> Checkpoint:
        for ckpt in self.checkpoints():
            if ckpt.version == version:
                return ckpt
        raise KeyError(f"no checkpoint with version {version} in {self.root}")

    def locate(self, reference: str, field: str = "registry_uri") -> Path:
        """The checkpoint folder a caller's reference names: a checkpoint id (`00000007-3f2a…`), a `file://` URI or
        an absolute path. It must resolve (symbolic links followed) to a folder directly under
        `<registry>/checkpoints/`; anything else raises NotInRegistry, saying nothing about what is there."""
        if CHECKPOINT_ID_RE.fullmatch(reference):
            path = self.root / "checkpoints" / reference
        else:
            path = path_from_uri(reference, field)
            if not path.is_absolute():
                raise NotInRegistry(field, reference)
        try:
            resolved = path.resolve(strict=True)
            home = (self.root / "checkpoints").resolve(strict=True)
            inside = resolved.parent == home and resolved.is_dir()
        except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a NUL byte
            inside = False
        if not inside or not CHECKPOINT_ID_RE.fullmatch(resolved.name):
            raise NotInRegistry(field, reference)
        return resolved

    def find(self, *, version: int = 0, run_id: str = "", checkpoint_id: str = "", uri: str = "") -> Path:
        """The folder of the one checkpoint a request names: by `version` (optionally checked against `run_id`), by
        `checkpoint_id`, or by `uri`; raises NotInRegistry (or CheckpointError for a request that names none or
        several)."""
        given = [name for name, value in (("version", version), ("checkpoint_id", checkpoint_id),
                                          ("registry_uri", uri)) if value]  # fmt: skip
        if len(given) != 1:
            raise CheckpointError(f"{'/'.join(given) or 'version'}: name one checkpoint by version (with its run_id), "
                                  "checkpoint_id or registry_uri")  # fmt: skip
        if version:
            try:
                ckpt = self.get(version)
            except KeyError:
                raise NotInRegistry("version", version) from None
            if run_id and ckpt.manifest.run_id != run_id:
                raise NotInRegistry("run_id", run_id)
            return self.locate(ckpt.path.name, "version")
        path = self.locate(checkpoint_id, "checkpoint_id") if checkpoint_id else self.locate(uri)
        if run_id:
            try:
                owner = Manifest.from_json(json.loads((path / MANIFEST).read_bytes())).run_id
            except (OSError, ValueError, TypeError):
                owner = None
            if owner != run_id:
                raise NotInRegistry("run_id", run_id)
        return path

    def find_requested(self, request: Any) -> Path:
        """`find` for a gRPC request that names a checkpoint (`version`, `run_id`, `checkpoint_id`, `registry_uri`).
        What is not a checkpoint of this registry is NOT_FOUND; a malformed request stays a CheckpointError, a
        ValueError whose message names its field ("registry_uri=…: …"), which services answer as INVALID_ARGUMENT."""
        from services.common.errors import NotFound

        try:
            return self.find(
                version=request.version, run_id=request.run_id, checkpoint_id=request.checkpoint_id,
                uri=request.registry_uri,
            )  # fmt: skip
        except NotInRegistry as exc:
            raise NotFound(str(exc)) from exc

    def latest(self, run_id: str | None = None) -> Checkpoint | None:
        found = self.checkpoints(run_id)
        return found[-1] if found else None

    def promote(self, ckpt: Checkpoint) -> None:
        record = {"version": ckpt.version, "uri": ckpt.uri, "manifest_sha256": ckpt.manifest_sha256,
                  "promoted_at": time.time()}  # fmt: skip
        tmp = self._folder("promotions") / f".{ckpt.version}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.root / "promotions" / f"{ckpt.version}.json")

    def promoted_versions(self) -> list[int]:
        if not (self.root / "promotions").is_dir():
            return []
        return sorted(int(p.stem) for p in (self.root / "promotions").glob("*.json") if p.stem.isdigit())

    def is_promoted(self, version: int) -> bool:
        return (self.root / "promotions" / f"{version}.json").is_file()

    def latest_promoted(self) -> Checkpoint | None:
        for version in reversed(self.promoted_versions()):
            try:
                return self.get(version)
            except KeyError:
                continue
        return None
