"""The trainer's CUDA path, end to end on a tiny model: prune, record teacher top-k, distil, checkpoint, reload.

Needs only torch, transformers, safetensors and numpy: a GPU machine may have no vLLM, Kafka, gRPC or protobuf.
It imports services.trainer.{pruning, batching, buffer, losses, device}, none of which import those (the run
records that nothing did). Steps:

1. a random bf16 Llama teacher (safetensors), pruned into a student by `pruning.prune` (importance, width + depth);
2. teacher samples "recorded" like the teacher service does: completions sampled from the teacher, then its top-k
   log-probs at every completion position by teacher-forced scoring (the Score path). A random teacher is nearly
   uniform, so its logits are sharpened (×8) to give the top-k real mass;
3. AdamW steps on the device with the project's batching (`collate`, `Batch.to`, `batch_loss`) and loss
   (`distillation_loss`, forward KL on the top-k + tail buckets plus cross-entropy on the sampled tokens), bf16
   autocast where the device has native bf16 (CUDA GPUs since Ampere); the loss must fall (mean of the last 10
   steps below the mean of the first 10);
4. the student saved as safetensors, reloaded on the CPU: same weights, logits within bf16 tolerance;
5. the same training timed on the CPU, for the CUDA/CPU tokens/s ratio.

Prints one JSON object. Exit code 0: every check passed; 1: a check failed; 3: no CUDA (and no --device cpu).

    make gpu-check                                            # on a GPU machine (no venv needed there)
    PYTHONPATH=. python3 scripts/gpu_check.py --device cpu    # the whole check on the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when run as a plain script

import numpy as np
import torch
import transformers

from services.trainer import pruning
from services.trainer.batching import batch_loss, collate
from services.trainer.buffer import SAMPLE, Item
from services.trainer.device import bf16_is_fast, device_name, resolve_device, synchronize
from services.trainer.losses import LossWeights

NO_CUDA = 3
#: Modules a GPU machine may not have; none of them may be imported by this check.
FORBIDDEN = ("grpc", "kafka", "vllm", "google.protobuf", "services.common.pb")
HEAD_DIM = 64
SHARPEN = 8.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: the whole check on the CPU only)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=128, help="teacher samples recorded and cycled through")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--completion-len", type=int, default=40)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256, help="the teacher's; a multiple of 128 (heads of 64)")
    p.add_argument("--layers", type=int, default=4, help="the teacher's; the student keeps half")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.hidden_size % (2 * HEAD_DIM) or args.layers < 2 or args.steps < 20:
        p.error("--hidden-size must be a multiple of 128, --layers at least 2 and --steps at least 20")
    return args


def build_teacher(folder: Path, args: argparse.Namespace) -> Path:
    """A random Llama teacher saved as bf16 safetensors (like the default teacher); no tokenizer is needed."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = args.hidden_size // HEAD_DIM
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=HEAD_DIM,
        max_position_embeddings=max(256, args.prompt_len + args.completion_len),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(folder)
    return folder


def record_samples(teacher_dir: Path, prompts: torch.Tensor, args: argparse.Namespace, device: Any) -> list[Item]:
    """Teacher completions of `prompts` (N, P) and the teacher's top-k log-probs at each completion position."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).to(device).eval()
    p, c = args.prompt_len, args.completion_len
    items = []
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        for start in range(0, prompts.shape[0], 32):
            ids = prompts[start : start + 32].to(device)
            # Sampling at temperature 1/SHARPEN is sampling from the sharpened distribution scored below.
            full = teacher.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0 / SHARPEN,
                top_k=0,
                max_new_tokens=c,
                min_new_tokens=c,
                pad_token_id=0,
            )
            # Teacher-forced scoring: hidden state at position j predicts token j + 1.
            logits = teacher(full).logits[:, p - 1 : p - 1 + c].float() * SHARPEN  # (B, C, V)
            top = logits.log_softmax(-1).topk(args.top_k, dim=-1)
            for b in range(full.shape[0]):
                items.append(
                    Item(
                        partition=0,
                        offset=start + b,
                        kind=SAMPLE,
                        input_ids=full[b].tolist(),
                        prompt_len=p,
                        top_ids=top.indices[b].cpu().numpy().astype(np.int64),
                        top_logprobs=top.values[b].cpu().numpy().astype(np.float32),
                    )
                )
    return items


def train(student_dir: Path, items: list[Item], args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """`args.steps` AdamW steps over `items` on `device`; losses, tokens/s and the model.

    bf16 autocast where the device computes bf16 natively (`bf16_is_fast`), as the trainer should: on a CPU
    without it, bf16 matmuls are emulated and tens of times slower than float32.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed + 2)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    weights = LossWeights(forward_kl=1.0, cross_entropy=1.0)
    autocast = bf16_is_fast(device)
    losses: list[float] = []
    tokens, started = 0, 0.0
    for step in range(args.steps):
        if step == 1:  # step 0 warms up (CUDA context, kernel choice, allocator): not timed
            synchronize(device)
            started = time.perf_counter()
        first = (step * args.batch_size) % len(items)
        batch = collate((items + items)[first : first + args.batch_size], pad_id=0).to(device)
        loss = batch_loss(model, batch, weights, autocast).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # a host sync per step, as the trainer's progress reporting does
        if step >= 1:
            tokens += batch.tokens
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {"model": model, "losses": losses, "tokens_per_s": tokens / elapsed, "autocast": autocast}


def check_reload(model: Any, folder: Path, probe: torch.Tensor, device: Any) -> dict[str, Any]:
    """Saves `model` as safetensors, reloads it on the CPU in float32: same weights, close logits."""
    from transformers import AutoModelForCausalLM

    model.eval()
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    same_weights = all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items())
    with torch.no_grad():
        # The device model runs as it trains (bf16 autocast where used); the reloaded one in float32 on the CPU.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_is_fast(device)):
            on_device = model(probe.to(device)).logits.float().cpu()
        on_cpu = reloaded(probe).logits
    diff = float((on_device - on_cpu).abs().max())
    # bf16 keeps 8 bits of mantissa: a few units of 2^-8 relative to the logits' scale is rounding, not a bug.
    tolerance = 0.05 * max(1.0, float(on_cpu.abs().max()))
    top1 = float((on_device.argmax(-1) == on_cpu.argmax(-1)).float().mean())
    return {
        "ok": same_weights and diff <= tolerance,
        "same_weights": same_weights,
        "max_logit_diff": round(diff, 5),
        "tolerance": round(tolerance, 5),
        "top1_agreement": round(top1, 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        teacher_dir = build_teacher(work / "teacher", args)
        prompts = torch.randint(3, args.vocab_size, (args.samples, args.prompt_len))
        heads = args.hidden_size // HEAD_DIM
        shape = pruning.Shape(
            num_layers=args.layers // 2,
            hidden_size=args.hidden_size // 2,
            intermediate_size=args.hidden_size,
            num_attention_heads=max(1, heads // 2),
            num_key_value_heads=max(1, heads // 4),
        )
        calibration = prompts[:32].tolist()
        pruned = pruning.prune(teacher_dir, shape, pruning.IMPORTANCE, calibration, work / "student")
        items = record_samples(teacher_dir, prompts, args, device)
        result = train(work / "student", items, args, device)
        losses = result["losses"]
        first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
        reload = check_reload(
            result["model"], work / "checkpoint", torch.tensor([it.input_ids for it in items[:4]]), device
        )
        del result["model"]
        if device.type == "cuda":
            cpu = train(work / "student", items, args, torch.device("cpu"))
            cpu_tps: float | None = cpu["tokens_per_s"]
            autocast = {"cuda": result["autocast"], "cpu": cpu["autocast"]}
            cuda_tps: float | None = result["tokens_per_s"]
        else:
            cpu_tps, cuda_tps = result["tokens_per_s"], None
            autocast = {"cpu": result["autocast"]}
    forbidden = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    checks = {"loss_falls": last < first, "checkpoint_reload_ok": reload["ok"], "light_imports": not forbidden}
    return {
        "ok": all(checks.values()),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "student_parameters": pruned.parameters,
        "student_layers": pruned.layers,
        "steps": args.steps,
        "batch": [args.batch_size, args.prompt_len + args.completion_len],
        "loss_first": round(first, 4),
        "loss_last": round(last, 4),
        "tokens_per_s_cuda": round(cuda_tps, 1) if cuda_tps else None,
        "tokens_per_s_cpu": round(cpu_tps, 1) if cpu_tps else None,
        "cuda_over_cpu": round(cuda_tps / cpu_tps, 2) if cuda_tps and cpu_tps else None,
        "bf16_autocast": autocast,
        "reload": reload,
        "forbidden_imports": forbidden,
        **checks,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
            "run it on a GPU machine, or pass --device cpu to run the whole check on the CPU",
            file=sys.stderr,
        )
        return NO_CUDA
    report = run(args)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
