"""Trainer ranks, 1 vs W: samples/s, step time and communication overhead of data-parallel steps on the same samples.

`measure_trainer(world_size)` trains a tiny Hugging Face student (made here, or `model_dir`) for a few optimizer
steps on synthetic items — the same items for every world size — with the trainer's own step code: one rank runs
what `TrainingRun` runs in-process, W ranks run `parallel.DataParallel` as gloo (or NCCL) processes. No broker: it
measures the training step and its communication, not the intake. On a machine with fewer cores than ranks × threads
the ranks compete for cores: the point there is correctness (the same losses) and overhead, not speed-up.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common import pb
from services.trainer.buffer import REFERENCE, SAMPLE, Item
from services.trainer.losses import LossWeights

WEIGHTS = LossWeights(forward_kl=1.0, reference_ce=1.0)
LOSSES_REPORTED = 5  # the first steps' losses, for comparing world sizes


def synthetic_items(vocab: int, count: int, seed: int = 0, max_targets: int = 8) -> list[Item]:
    """`count` items of uneven lengths: teacher samples with a top-5 (every third a reference answer, every fifth a
    scored student completion), token ids in [3, vocab)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        prompt, targets = int(rng.integers(2, 7)), int(rng.integers(1, max_targets + 1))
        ids = rng.integers(3, vocab, prompt + targets).tolist()
        if i % 3 == 2:
            out.append(Item(0, i, REFERENCE, ids, prompt, source=REFERENCE))
            continue
        top_ids = np.stack([rng.choice(vocab, 5, replace=False) for _ in range(targets)]).astype(np.int64)
        probs = rng.dirichlet(np.ones(6), targets)[:, :5].astype(np.float32)  # the 6th is the tail's mass
        source = "scored_student" if i % 5 == 4 else "generated"
        out.append(Item(0, i, SAMPLE, ids, prompt, top_ids, np.log(probs), source=source))
    return out


def _rank(rank: int, world: int, port: int, folder: Path, items: list[Item], cfg: dict[str, Any], out: Path) -> None:
    """One rank of the measurement (a spawned process); rank 0 writes the result JSON to `out`."""
    from services.common.models import load_causal_lm
    from services.common.process import set_parent_death_signal
    from services.trainer.batching import batch_loss, collate
    from services.trainer.loop import make_optimizer
    from services.trainer.parallel import DataParallel
    from services.trainer.ranks import init_group

    set_parent_death_signal()
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"] if world == 1 or cfg["device"] == "cpu" else f"cuda:{rank}")
    torch.manual_seed(0)
    model = load_causal_lm(folder, dtype=torch.float32).to(device)
    model.train()
    optimizer = make_optimizer(model, pb.trainer.Schedule(learning_rate=cfg["lr"], weight_decay=0.1))
    dp: DataParallel | None = None
    if world > 1:
        init_group(rank, world, port, device, 600)
        dp = DataParallel(model, optimizer, WEIGHTS, WEIGHTS, False, device)
        dp.sync_weights()
        if rank > 0:
            dp.follow()
            torch.distributed.destroy_process_group()
            return
    batch, accum, warmup = cfg["batch_size"], cfg["grad_accum_steps"], cfg["warmup"]
    times, losses, targets = [], [], 0
    for step in range(warmup + cfg["steps"]):
        if step == warmup and dp is not None:
            dp.timers = type(dp.timers)()  # count communication after the warm-up only
        started = time.perf_counter()
        total = 0.0
        for m in range(accum):
            start = (step * accum + m) * batch
            part = items[start : start + batch]
            if dp is not None:
                micro = dp.micro(part, accum)
                assert micro.failure is None, micro.failure
                total += micro.loss
                n = micro.targets
            else:  # what TrainingRun does with one rank
                b = collate(part, 0).to(device)
                loss = batch_loss(model, b, WEIGHTS, False, None, WEIGHTS)
                (loss.loss / accum).backward()
                total += float(loss.loss.detach())
                n = b.targets_count
            if step >= warmup:
                targets += n
        if dp is not None:
            dp.step(cfg["lr"], 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
        losses.append(total / accum)
    steps = len(times)
    elapsed = sum(times)
    timers = dp.timers if dp is not None else None
    result = {
        "world_size": world,
        "backend": torch.distributed.get_backend() if dp is not None else "none",
        "device": str(device),
        "threads_per_rank": cfg["threads"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "gradient_bytes": 4 * sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "batch_size": batch,
        "grad_accum_steps": accum,
        "samples_per_s": steps * accum * batch / elapsed,
        "target_tokens_per_s": targets / elapsed,
        "step_s_mean": elapsed / steps,
        "step_s_p50": statistics.median(times),
        "allreduce_s_per_step": timers.allreduce_s / steps if timers else 0.0,
        "scatter_s_per_step": timers.scatter_s / steps if timers else 0.0,
        "result_reduce_s_per_step": timers.reduce_s / steps if timers else 0.0,
        "losses": losses[:LOSSES_REPORTED],
    }
    comm = result["allreduce_s_per_step"] + result["scatter_s_per_step"] + result["result_reduce_s_per_step"]
    result["communication_share"] = comm / result["step_s_mean"]
    out.write_text(json.dumps(result))
    if dp is not None:
        dp.close()
        torch.distributed.destroy_process_group()


def measure_trainer(
    world_size: int,
    *,
    steps: int = 20,
    warmup: int = 3,
    batch_size: int = 8,
    grad_accum_steps: int = 1,
    threads_per_rank: int = 1,
    device: str = "cpu",
    model_dir: Path | None = None,
    hidden_size: int = 256,
    num_layers: int = 4,
    vocab_size: int = 2048,
    seed: int = 0,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Trains `warmup + steps` optimizer steps of `grad_accum_steps` micro-batches of `batch_size` items (the global
    micro-batch: each of `world_size` ranks gets a 1/W slice) and returns rate, step time and, per step, the seconds
    rank 0 spent in the gradient all-reduce, in sending the slices and in the per-micro-batch result all-reduce
    (`communication_share` = their sum / step time), plus the first steps' losses (equal for every world size up to
    float rounding). `device` "cpu" (gloo) or "cuda" (NCCL, a GPU per rank). Each rank is a fresh process."""
    from services.common.process import free_port
    from services.common.tiny import build_llama

    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be at least 1")
    with tempfile.TemporaryDirectory(prefix="scale-trainer-") as tmp:
        folder = model_dir or build_llama(
            Path(tmp) / "student", hidden_size=hidden_size, num_layers=num_layers, num_heads=4, num_kv_heads=2,
            intermediate_size=2 * hidden_size, vocab_size=vocab_size, seed=seed, dtype="float32",
        )  # fmt: skip
        vocab = int(json.loads((folder / "config.json").read_text())["vocab_size"])
        items = synthetic_items(vocab, (warmup + steps) * grad_accum_steps * batch_size, seed)
        cfg = {"steps": steps, "warmup": warmup, "batch_size": batch_size, "grad_accum_steps": grad_accum_steps,
               "threads": threads_per_rank, "device": device, "lr": 1e-3}  # fmt: skip
        out = Path(tmp) / "result.json"
        ctx = multiprocessing.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_rank, args=(r, world_size, port, folder, items, cfg, out))
                 for r in range(world_size)]  # fmt: skip
        started = time.monotonic()
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(max(1.0, timeout_s - (time.monotonic() - started)))
            codes = [p.exitcode for p in procs]
            if codes != [0] * world_size or not out.is_file():
                raise RuntimeError(f"scale_trainer: ranks exited with {codes} (timeout {timeout_s:.0f}s)")
            result: dict[str, Any] = json.loads(out.read_text())
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                if p.pid is not None:
                    p.join(30)
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result
