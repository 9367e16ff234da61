"""A student with and without a restricted output vocabulary, through vLLM directly: N, coverage, tokens/s.

`python -m services.bench.output_vocab STUDENT_DIR WORK_DIR` copies a full-vocabulary student folder into WORK_DIR,
trims a copy with the benchmarks' restricted head (`services/bench/students.py`: the default use case's questions
and worked references in the chat template plus the special tokens, at `--coverage`), times the logits scatter with
and without the sampler's float32 copy, then runs one offline engine per model (eager unless `--compile`, each in a
child process of its own) and alternates greedy `ignore_eos` batches between them. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def prompt_ids(tokenizer: Any, chat: list[dict[str, str]]) -> list[int]:
    """A question in the chat template with the assistant's turn opened."""
    out = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    return [int(t) for t in (out if isinstance(out, list) else out["input_ids"])]


def _engine(folder: str, max_tokens: int, compile_model: bool, conn: Connection) -> None:
    """Child process: one offline engine; answers each batch of prompts with (tokens, seconds, distinct ids)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from services.common.vllm_engine import VllmSettings, offline_llm

    settings = VllmSettings(enforce_eager=not compile_model, max_num_seqs=128)
    with offline_llm(Path(folder), settings) as llm:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        conn.send(str(llm.llm_engine.model_config.dtype))
        while (batch := conn.recv()) is not None:
            started = time.perf_counter()
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
            seconds = time.perf_counter() - started
            ids = sorted({t for o in outs for t in o.outputs[0].token_ids})
            conn.send((sum(len(o.outputs[0].token_ids) for o in outs), seconds, ids))


def _scatter_then_convert(head: Any, index: Any, vocab_size: int, dtype: Any) -> None:
    """One step's logits: scattered in `dtype`, then converted as the sampler does (a copy for bf16, a no-op for
    float32). A function, so that its tensors are freed before the next call as an engine step's are (a loop that
    keeps the previous step's tensor alive while allocating the next measured 6x slower: fresh pages every call)."""
    import torch

    full = torch.full((head.shape[0], vocab_size), float("-inf"), dtype=dtype)
    full[:, index] = head.to(dtype)
    full.to(torch.float32)


def logits_return_cost(ids: list[int], vocab_size: int, sizes: list[int], calls: int = 100) -> dict[str, float]:
    """Microseconds per call of the scatter in `compute_logits` plus the sampler's float32 conversion, with bf16 head
    logits (an engine on a CPU with native bf16): scattered into a bf16 tensor that the sampler then copies to
    float32, or scattered into float32 directly (what `outvocab_vllm.scatter_logits` does; the sampler's `.to` is
    then a no-op)."""
    import torch

    index = torch.tensor(ids)
    runs: dict[str, list[float]] = {}
    for _ in range(5):  # the median of 5 passes: the first calls in a process were 10x slower, and neighbours spike
        for size in sizes:
            head = torch.randn(size, len(ids), dtype=torch.bfloat16)
            for name, dtype in (("bf16_then_copy", torch.bfloat16), ("float32_direct", torch.float32)):
                started = time.perf_counter()
                for _ in range(calls):
                    _scatter_then_convert(head, index, vocab_size, dtype)
                runs.setdefault(f"{name}_{size}_us", []).append((time.perf_counter() - started) / calls * 1e6)
    return {key: round(statistics.median(values), 1) for key, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path, help="a full-vocabulary student folder (read only)")
    parser.add_argument("work", type=Path, help="where the copy and the trimmed copy are written")
    parser.add_argument("--coverage", type=float, default=0.999)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="prompts per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--compile", action="store_true", help="torch.compile the engines (default: eager)")
    args = parser.parse_args()

    from services.bench.students import output_vocab_info, trimmed_student
    from services.common.models import load_tokenizer, parameter_count
    from services.common.outvocab_vllm import stored_token_ids
    from services.tasks.builtin import default_prompts

    full = args.work / "full"
    if full.exists():
        shutil.rmtree(full)
    shutil.copytree(args.student, full)
    trimmed = trimmed_student(args.work, full, args.coverage)  # cached in WORK_DIR by coverage
    ids = stored_token_ids(trimmed)
    assert ids is not None
    vocab_size = int(json.loads((full / "config.json").read_text())["vocab_size"])
    result: dict[str, Any] = {"output_vocab": output_vocab_info(trimmed), "parameters_full": parameter_count(full)}
    result["logits_return_us"] = logits_return_cost(ids.tolist(), vocab_size, args.sizes)

    tokenizer = load_tokenizer(full)
    prompts = [prompt_ids(tokenizer, e.content.chat()) for e in default_prompts(max(args.sizes), seed=4321)]
    ctx = mp.get_context("spawn")
    engines: dict[str, tuple[Any, Connection]] = {}
    try:
        for name, folder in (("full", full), ("trimmed", trimmed)):
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_engine, args=(str(folder), args.max_tokens, args.compile, child), daemon=True)
            proc.start()
            engines[name] = (proc, conn)
            result[f"dtype_{name}"] = conn.recv()
        for _, conn in engines.values():  # first batches of a fresh engine are slow
            conn.send(prompts[:8])
            conn.recv()
        rates: dict[str, list[float]] = {}
        head = set(ids.tolist())
        for repeat in range(args.repeats):
            for size in args.sizes:
                for name in ("full", "trimmed") if repeat % 2 == 0 else ("trimmed", "full"):
                    conn = engines[name][1]
                    conn.send(prompts[:size])
                    tokens, seconds, emitted = conn.recv()
                    if name == "trimmed" and not set(emitted) <= head:
                        raise RuntimeError("the trimmed engine emitted ids outside its head")
                    rates.setdefault(f"{name}_{size}", []).append(round(tokens / seconds, 1))
    finally:
        for proc, conn in engines.values():
            conn.send(None)
            proc.join(60)
    result["tokens_per_s"] = rates
    medians = {key: statistics.median(values) for key, values in rates.items()}
    result["median_tokens_per_s"] = medians
    result["speedup"] = {size: round(medians[f"trimmed_{size}"] / medians[f"full_{size}"], 3) for size in args.sizes}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
