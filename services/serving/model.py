"""What a served model is: its version and lineage, and the fingerprint that says whether weights can be swapped in.

Two models with the same fingerprint have the same architecture (config.json, dtype aside) and the same tokenizer,
chat template and generation defaults: one's weights can be loaded into an engine started for the other. Students
with a restricted output vocabulary of the same size share a fingerprint whatever their token ids: the id map is a
tensor of the weights (`lm_head.token_ids`), reloaded with them and checked afterwards (`VllmEngine.reload`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.registry import Checkpoint

#: Files besides the weights that an engine bakes in at start: tokenizer, chat template, generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
#: config.json keys that do not change what an engine computes (the engine's own dtype setting wins).
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache")


def fingerprint(folder: Path) -> str:
    """sha256 over the normalised config.json and the tokenizer files of a model folder."""
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        file = folder / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    """One servable model version. Version 0 is a configured base model, not a registry checkpoint."""

    version: int
    name: str
    path: Path
    fingerprint: str
    run_id: str = ""
    registry_uri: str = ""
    manifest_sha256: str = ""
    parameter_count: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> ModelInfo:
        return cls(
            version=ckpt.version,
            name=ckpt.path.name,
            path=ckpt.path,
            fingerprint=fingerprint(ckpt.path),
            run_id=ckpt.manifest.run_id,
            registry_uri=ckpt.uri,
            manifest_sha256=ckpt.manifest_sha256,
            parameter_count=ckpt.manifest.parameter_count,
            metrics={k: float(v) for k, v in ckpt.manifest.metrics.items()},
        )

    @classmethod
    def from_folder(cls, folder: Path, name: str, parameter_count: int = 0) -> ModelInfo:
        return cls(version=0, name=name, path=folder, fingerprint=fingerprint(folder), parameter_count=parameter_count)

    def swappable_with(self, other: ModelInfo) -> bool:
        return self.fingerprint == other.fingerprint
