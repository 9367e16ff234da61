"""Data-parallel steps (`parallel.py`) on 2 real gloo ranks (processes) train the same steps as one rank with
twice the batch: the same losses and the same parameters, within float32 tolerance."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.bench.scale_trainer import synthetic_items
from services.common import pb
from services.common.process import free_port
from services.trainer.batching import batch_loss, collate
from services.trainer.buffer import Item
from services.trainer.losses import LossWeights
from services.trainer.parallel import slices

STEPS, ACCUM, PER_RANK = 3, 2, 3  # 3 optimizer steps of 2 micro-batches; 3 items per rank, 6 on one rank
LR, CLIP = 1e-3, 1.0
WEIGHTS = LossWeights(forward_kl=1.0, cross_entropy=0.3, reference_ce=0.5)
ON_POLICY = LossWeights(forward_kl=0.0, reverse_kl=1.0)


def _model(folder: Path) -> tuple[Any, torch.optim.Optimizer]:
    from services.common.models import load_causal_lm
    from services.trainer.loop import make_optimizer

    torch.manual_seed(0)
    model = load_causal_lm(folder, dtype=torch.float32)
    model.train()
    schedule = pb.trainer.Schedule(learning_rate=LR, weight_decay=0.1)
    return model, make_optimizer(model, schedule)


def _one_rank(folder: Path, items: list[Item]) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """What `TrainingRun` does with one rank: collate, loss / accum, backward per micro-batch; clip and step.
    Also returns the targets a restricted output vocabulary had no row for."""
    model, optimizer = _model(folder)
    losses, outside = [], 0
    batch = 2 * PER_RANK
    for step in range(STEPS):
        total = 0.0
        for m in range(ACCUM):
            start = (step * ACCUM + m) * batch
            out = batch_loss(model, collate(items[start : start + batch], 0), WEIGHTS, False, None, ON_POLICY)
            (out.loss / ACCUM).backward()
            total += float(out.loss.detach())
            outside += out.outside_head
        for group in optimizer.param_groups:
            group["lr"] = LR
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / ACCUM)
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}, outside


def _rank(rank: int, port: int, folder: Path, items: list[Item], out: Path) -> None:
    """One gloo rank: rank 0 drives `DataParallel` the way the training loop does, rank 1 follows."""
    from services.trainer.parallel import DataParallel
    from services.trainer.ranks import init_group

    torch.set_num_threads(1)
    init_group(rank, 2, port, torch.device("cpu"), 120)
    model, optimizer = _model(folder)
    dp = DataParallel(model, optimizer, WEIGHTS, ON_POLICY, False, torch.device("cpu"))
    dp.sync_weights()
    if rank == 1:
        dp.follow()
    else:
        losses, outside = [], 0
        batch = 2 * PER_RANK
        for step in range(STEPS):
            total = 0.0
            for m in range(ACCUM):
                start = (step * ACCUM + m) * batch
                result = dp.micro(items[start : start + batch], ACCUM)
                assert result.failure is None, result.failure
                total += result.loss
                outside += result.outside_head
            dp.step(LR, CLIP)
            losses.append(total / ACCUM)
        dp.close()
        tensors = {k: v.detach().clone() for k, v in model.named_parameters()}
        save_file({**tensors, "losses": torch.tensor(losses, dtype=torch.float64), "outside": torch.tensor(outside)},
                  str(out))  # fmt: skip
    torch.distributed.destroy_process_group()


def test_slices_are_contiguous_and_near_equal() -> None:
    assert [len(s) for s in slices(list(range(7)), 3)] == [3, 2, 2]
    assert [len(s) for s in slices(list(range(1)), 2)] == [1, 0]
    assert [x for part in slices(list(range(7)), 3) for x in part] == list(range(7))


def test_a_packed_slice_comes_back_bit_for_bit() -> None:
    from services.trainer.parallel import pack, packed_size, unpack

    items = synthetic_items(512, 7, seed=5)  # samples, references, on-policy completions
    assert items[0].top_logprobs is not None
    items[0].top_logprobs[:, -1] = -np.inf  # a top-k shorter than K
    batch = collate(items, 0)
    b, s = batch.input_ids.shape
    rows, k = batch.top_ids.shape
    payload = pack(batch)
    assert payload.dtype == torch.int64 and payload.numel() == packed_size(b, s, batch.targets_count, k, rows)
    back = unpack(payload, b, s, batch.targets_count, k, batch.n_teacher, batch.n_student, batch.tokens)
    for name in ("input_ids", "positions", "targets", "top_ids", "top_valid", "weights", "sources"):
        assert torch.equal(getattr(back, name), getattr(batch, name)), name
    assert torch.equal(back.top_logprobs, batch.top_logprobs) and bool(torch.isinf(batch.top_logprobs).any())
    assert (back.n_teacher, back.n_student, back.tokens) == (batch.n_teacher, batch.n_student, batch.tokens)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "restricted",
    [
        pytest.param(False, id="full-vocabulary"),
        # make test's time: the restricted head's loss mapping is covered in test_output_vocab.py
        pytest.param(True, id="restricted-vocabulary", marks=pytest.mark.slow),
    ],
)
def test_two_gloo_ranks_train_the_same_steps_as_one_rank_with_twice_the_batch(tmp_path: Path, restricted: bool) -> None:
    from services.common.outvocab import trim_folder
    from services.common.tiny import build_llama

    folder = build_llama(tmp_path / "student", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                         intermediate_size=96, vocab_size=512, seed=3, dtype="float32")  # fmt: skip
    if restricted:  # a head over the even ids: half the targets have no row (masked, and counted by every rank)
        trim_folder(folder, range(0, 512, 2), tmp_path / "restricted")
        folder = tmp_path / "restricted"
    items = synthetic_items(512, STEPS * ACCUM * 2 * PER_RANK)  # samples, references, on-policy
    # Each micro-batch's two halves differ in position counts: the global normalization is what makes them add up.
    halves = [slices(items[i : i + 2 * PER_RANK], 2) for i in range(0, len(items), 2 * PER_RANK)]
    assert any(sum(it.targets for it in a) != sum(it.targets for it in b) for a, b in halves)

    expected_losses, expected, expected_outside = _one_rank(folder, items)
    assert (expected_outside > 0) == restricted

    ctx = multiprocessing.get_context("spawn")
    port, out = free_port(), tmp_path / "rank0.safetensors"
    procs = [ctx.Process(target=_rank, args=(r, port, folder, items, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(240)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(30)
    got = load_file(str(out))
    losses = got.pop("losses").tolist()
    assert int(got.pop("outside")) == expected_outside
    assert losses == pytest.approx(expected_losses, rel=1e-5, abs=1e-6)
    assert losses[0] != pytest.approx(losses[-1], rel=1e-4)  # the steps changed the model
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-5), (name, (got[name] - value).abs().max())
