"""vLLM's model class for a restricted output vocabulary: logits scatter, folder checks, registration, and a real
float32 engine against the Hugging Face model (tiny Llama, trimmed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.outvocab import ARCHITECTURE, TOKEN_IDS, OutputVocabError, check_folder, trim_folder
from services.common.outvocab_vllm import (
    MODEL_CLASS,
    FullLogits,
    register,
    scatter_logits,
    stored_token_ids,
    token_ids_digest,
)

ROOT = Path(__file__).resolve().parents[2]
#: Every third id and the special tokens (0-2): 342 rows.
HEAD = sorted({0, 1, 2, *range(0, 1024, 3)})


@pytest.fixture(scope="module")
def trimmed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("outvocab-vllm") / "trimmed"
    trim_folder(tiny_model_dir, HEAD, folder)
    return folder


def test_scatter_logits_places_each_row_on_its_token_and_masks_the_rest() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.bfloat16)
    full = scatter_logits(logits, torch.tensor([1, 4, 6]), vocab_size=8)
    assert full.dtype == torch.float32 and full.shape == (2, 8)
    assert full[:, [1, 4, 6]].tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert torch.isneginf(full[:, [0, 2, 3, 5, 7]]).all()


def test_the_reused_logits_buffer_equals_a_fresh_scatter_at_every_step() -> None:
    """Steps of varying batch size, a sampler that modifies the logits in place (temperature, penalties, a top-k
    mask, a logit bias on a token outside the head), and an in-place reload that brings another id map."""
    torch.manual_seed(0)
    full = FullLogits(vocab_size=50)
    ids = torch.tensor([0, 3, 7, 11, 20, 49])
    for step, rows in enumerate([4, 9, 2, 9, 130, 1]):
        if step == 3:
            ids.copy_(torch.tensor([1, 3, 8, 12, 21, 48]))  # the reload copies into the same tensor
        head = torch.randn(rows, 6, dtype=torch.bfloat16)
        out = full(head, ids)
        assert out.shape == (rows, 50) and out.dtype == torch.float32
        assert torch.equal(out, scatter_logits(head, ids, 50)), step
        # What vLLM's sampler may do in place before the next step: none of it makes -inf finite.
        out.div_(0.7)
        out.sub_(0.3)
        out[:, 5] += 2.0
        out[:, 3] = float("-inf")
        assert torch.isneginf(out[:, 5]).all()


def test_check_folder_accepts_a_trimmed_student_and_ignores_a_full_one(trimmed: Path, tiny_model_dir: Path) -> None:
    assert check_folder(trimmed) == len(HEAD)
    assert check_folder(tiny_model_dir) is None
    assert stored_token_ids(trimmed).tolist() == HEAD  # type: ignore[union-attr]
    assert stored_token_ids(tiny_model_dir) is None
    assert token_ids_digest(None) == ""
    assert token_ids_digest(torch.tensor(HEAD, dtype=torch.int32)) == token_ids_digest(stored_token_ids(trimmed))


def _broken(trimmed: Path, tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    folder.mkdir()
    for file in trimmed.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    weights = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    if kind == "not_ascending":
        weights[TOKEN_IDS][[3, 4]] = weights[TOKEN_IDS][[4, 3]]
    elif kind == "out_of_range":
        weights[TOKEN_IDS][-1] = 5000
    elif kind == "wrong_length":
        weights[TOKEN_IDS] = weights[TOKEN_IDS][:-1]
    elif kind == "missing_ids":
        del weights[TOKEN_IDS]
    elif kind == "float_ids":
        weights[TOKEN_IDS] = weights[TOKEN_IDS].float()
    elif kind == "other_architecture":
        config["architectures"] = ["LlamaForCausalLM"]
    elif kind == "head_rows":
        weights["lm_head.weight"] = weights["lm_head.weight"][:-1]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("not_ascending", "strictly ascending"),
        ("out_of_range", "must be in [0, 1024)"),
        ("wrong_length", f"config.output_vocab_size={len(HEAD)} but lm_head.token_ids has {len(HEAD) - 1} ids"),
        ("missing_ids", "the weights have no lm_head.token_ids"),
        ("float_ids", "must hold integers"),
        ("other_architecture", "config.architectures is ['LlamaForCausalLM']"),
        ("head_rows", f"lm_head.weight has shape ({len(HEAD) - 1}, 128)"),
    ],
)
def test_check_folder_names_what_is_malformed(trimmed: Path, tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(OutputVocabError) as err:
        check_folder(_broken(trimmed, tmp_path, kind))
    assert message in str(err.value)


def test_register_is_idempotent() -> None:
    from vllm import ModelRegistry

    register()
    first = ModelRegistry.models[ARCHITECTURE]
    register()
    assert ModelRegistry.models[ARCHITECTURE] is first
    assert (first.module_name, first.class_name) == tuple(MODEL_CLASS.split(":"))


def test_pyproject_declares_the_vllm_plugin() -> None:
    import importlib

    plugins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    module, function = plugins["distillery_outvocab"].split(":")
    assert getattr(importlib.import_module(module), function) is register


#: A plain `vllm.LLM` that never calls the project's `register()`: only the `vllm.general_plugins` entry point can
#: make the architecture known, in this process and in the engine-core and worker processes vLLM spawns.
ENGINE_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=folder, tokenizer=folder, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4,
          kv_cache_memory_bytes=1 << 27, load_format="safetensors", seed=0)
inputs = [{"prompt_token_ids": p} for p in prompts]
greedy = llm.generate(inputs, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1))
sampled = llm.generate(inputs, SamplingParams(max_tokens=64, temperature=1.0, ignore_eos=True))
print("RESULT " + json.dumps({
    "greedy": [list(o.outputs[0].token_ids) for o in greedy],
    "logprobs": [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in greedy],
    "sampled": [list(o.outputs[0].token_ids) for o in sampled],
}))
"""


@pytest.mark.e2e
def test_float32_engine_generates_the_hf_models_greedy_tokens_from_its_head_only(trimmed: Path, tmp_path: Path) -> None:
    from services.common.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(trimmed)
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for text in ("Tom has 3 apples and buys 5 more. How many apples?", "Is this review positive?", "Hello")
    ]
    # The project's entry point as an installed distribution would declare it (without installing anything).
    plugins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    dist = tmp_path / "site" / "distillery_plugin_check-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: distillery-plugin-check\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm.general_plugins]\n" + "".join(f"{k} = {v}\n" for k, v in plugins.items())
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(dist.parent), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",  # engine core (and its worker) spawned by vLLM's own code
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT, str(trimmed), json.dumps(prompts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))

    reference = load_causal_lm(trimmed, dtype=torch.float32)
    for prompt, tokens, logprobs, sampled in zip(
        prompts, result["greedy"], result["logprobs"], result["sampled"], strict=True
    ):
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )[0, len(prompt) :].tolist()
            logits = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        assert tokens == expected
        hf_logprobs = torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
        assert max(abs(a - b) for a, b in zip(logprobs, hf_logprobs.tolist(), strict=True)) < 1e-3
        assert len(sampled) == 64 and set(sampled) <= set(HEAD)
