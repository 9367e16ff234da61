"""Data-parallel steps over torch.distributed: rank 0 reads and slices each micro-batch, every rank trains its slice.

Rank 0 runs the whole run as one rank does (intake, replay buffer, offsets, evaluation, checkpoints, announcements);
the other ranks only compute. Per micro-batch, rank 0 broadcasts a header (what comes next, the batch's global
position counts), sends every other rank its slice of the collated items (point-to-point tensors, no pickle), and
all ranks run forward and backward on their slice. Each loss term is divided by the *global* count of its positions
(`distillation_loss(counts=…)`), so the ranks' gradients sum to the gradient of the whole micro-batch on one rank;
an optimizer step sums the accumulated gradients over the ranks in one flat all-reduce, then every rank clips and
steps its own replica of AdamW on identical numbers: the replicas stay equal without broadcasting weights.

A micro-batch that raises on any rank is quarantined by rank 0 as a whole (and, when a backward had begun anywhere,
the step's accumulation is dropped everywhere). Any failure of a collective (a rank died) raises `RankLost`: the
launcher (`ranks.py`) then restarts every rank from the newest checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from services.trainer.batching import Batch, batch_loss, collate
from services.trainer.buffer import SOURCES, Item
from services.trainer.losses import COMPONENTS, ON_POLICY_COMPONENTS, LossWeights

# Header ops, broadcast by rank 0.
MICRO, STEP, STOP = 1.0, 2.0, 3.0
HEADER = 8  # op, grad_accum_steps, Nt, No, Nr, learning rate, max_grad_norm, spare
META = 8  # B, S, N, K, n_teacher, n_student, tokens, spare
PARTS = (*COMPONENTS, *ON_POLICY_COMPONENTS)


class RankLost(RuntimeError):
    """A collective failed: another rank died or the group broke. The run restarts from its newest checkpoint."""


@dataclass
class Micro:
    """One micro-batch's result over all ranks: what the loop accumulates for progress, or the failure to quarantine.

    `loss` and `parts` are the micro-batch's (the sum of the ranks' shares); `targets`/`tokens` its global counts.
    """

    loss: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    source_loss: dict[str, float] = field(default_factory=dict)
    source_tokens: dict[str, int] = field(default_factory=dict)
    targets: int = 0
    tokens: int = 0
    failure: Exception | None = None
    backward: bool = False  # a backward had begun when it failed (partial gradients to drop)
    outside_head: int = 0  # target tokens a restricted output vocabulary has no row for


@dataclass
class Timers:
    """Seconds rank 0 spent on communication, for the scale benchmark."""

    scatter_s: float = 0.0  # header + slices to the other ranks
    reduce_s: float = 0.0  # the per-micro-batch result all-reduce (waits for the slowest rank)
    allreduce_s: float = 0.0  # the gradient all-reduce of each optimizer step
    steps: int = 0


def slices(items: Sequence[Item], world: int) -> list[list[Item]]:
    """Contiguous, near-equal slices (the first ones one longer); a slice is empty when items < world."""
    n, extra = divmod(len(items), world)
    out, start = [], 0
    for r in range(world):
        end = start + n + (1 if r < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def comm_device(device: torch.device) -> torch.device:
    """Where collectives' tensors live: NCCL moves CUDA tensors only, gloo host tensors."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def share_start(device: torch.device, folder: str | None, resumed: bool = False) -> tuple[str, bool]:
    """Rank 0 (`folder` given) tells the other ranks (`folder` None) the student folder the run starts from, and
    whether it is a checkpoint to resume (with optimizer state); "" means there is no run. Returns it on every rank."""
    raw = torch.zeros(4096, dtype=torch.uint8)
    if folder is not None:
        data = folder.encode()
        if len(data) > raw.numel() - 1:
            raise ValueError(f"student folder path longer than {raw.numel() - 1} bytes: {folder}")
        raw[0] = int(resumed)
        raw[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    raw = raw.to(comm_device(device))
    try:
        dist.broadcast(raw, src=0)
    except RuntimeError as exc:
        raise RankLost(f"rank {dist.get_rank()}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    values = raw.cpu().tolist()
    return bytes(v for v in values[1:] if v).decode(), bool(values[0])


def _counts(batch: Batch) -> tuple[int, int, int]:
    n = batch.targets_count
    return batch.n_teacher, batch.n_student, n - batch.n_teacher - batch.n_student


class DataParallel:
    """One rank's side of the data-parallel steps; rank 0 drives (`micro`, `step`, `close`), others `follow`."""

    def __init__(
        self,
        model: Any,
        optimizer: torch.optim.Optimizer,
        weights: LossWeights,
        on_policy: LossWeights,
        autocast: bool,
        device: torch.device,
        pad_id: int = 0,
        body: Any = None,
    ) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.model = model
        self.optimizer = optimizer
        self.weights = weights
        self.on_policy = on_policy
        self.autocast = autocast
        self.device = device
        self.pad_id = pad_id
        self.body = body
        self.comm = comm_device(device)
        self.timers = Timers()
        self.closed = False

    # --- collectives, each turning a failure into RankLost -------------------------------------------------------

    def _collective(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except RuntimeError as exc:  # gloo/NCCL errors (DistBackendError is one): a peer is gone
            raise RankLost(f"rank {self.rank}: {type(exc).__name__}: {str(exc)[:300]}") from exc

    def _header(self, values: Sequence[float] | None = None) -> Tensor:
        header = torch.zeros(HEADER, dtype=torch.float64, device=self.comm)
        if values is not None:
            header[: len(values)] = torch.tensor(values, dtype=torch.float64)
        self._collective(dist.broadcast, header, src=0)
        return header.cpu()

    def sync_weights(self) -> None:
        """Every rank takes rank 0's parameters (one flat broadcast)."""
        params = [p.data for p in self.model.parameters()]
        flat = torch.cat([p.reshape(-1) for p in params]).to(self.comm)
        self._collective(dist.broadcast, flat, src=0)
        flat = flat.to(self.device)
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    # --- rank 0 --------------------------------------------------------------------------------------------------

    def micro(self, items: Sequence[Item], accum: int) -> Micro:
        """Rank 0: slices `items` over the ranks, trains its own slice, and returns the whole micro-batch's result."""
        batches = [collate(part, self.pad_id) if part else None for part in slices(items, self.world)]
        counts = [_counts(b) if b is not None else (0, 0, 0) for b in batches]
        total = tuple(sum(c[i] for c in counts) for i in range(3))
        started = time.perf_counter()
        self._header([MICRO, accum, *total])
        for r in range(1, self.world):
            self._send(batches[r], r)
        self.timers.scatter_s += time.perf_counter() - started
        local = self._train_slice(batches[0], accum, total)  # type: ignore[arg-type]
        result = self._reduce(local)
        result.targets = sum(b.targets_count for b in batches if b is not None)
        result.tokens = sum(b.tokens for b in batches if b is not None)
        return result

    def step(self, lr: float, max_grad_norm: float) -> None:
        """Rank 0: one optimizer step on every rank (gradients summed over the ranks, then clip and AdamW)."""
        self._header([STEP, 0, 0, 0, 0, lr, max_grad_norm])
        self._apply(lr, max_grad_norm)

    def close(self) -> None:
        """Rank 0: the other ranks leave `follow` (the run ended); a no-op after the first call."""
        if not self.closed:
            self.closed = True
            self._header([STOP])

    # --- the other ranks ----------------------------------------------------------------------------------------

    def follow(self) -> int:
        """Ranks > 0: train the slices rank 0 sends until it says stop; returns the optimizer steps taken."""
        steps = 0
        while True:
            header = self._header()
            op = float(header[0])
            if op == STOP:
                return steps
            if op == STEP:
                self._apply(float(header[5]), float(header[6]))
                steps += 1
            elif op == MICRO:
                total = (int(header[2]), int(header[3]), int(header[4]))
                self._reduce(self._train_slice(self._recv(), int(header[1]), total))
            else:
                raise RankLost(f"rank {self.rank}: unknown op {op} from rank 0")

    # --- every rank ---------------------------------------------------------------------------------------------

    def _train_slice(self, batch: Batch | None, accum: int, total: tuple[int, int, int]) -> Micro:
        """Forward and backward of this rank's slice (None: an empty slice, nothing to do)."""
        out = Micro()
        if batch is None:
            return out
        try:
            batch = batch.to(self.device)
            step = batch_loss(self.model, batch, self.weights, self.autocast, self.body, self.on_policy, total)
            if not torch.isfinite(step.loss.detach()):
                raise FloatingPointError(f"non-finite loss {float(step.loss.detach())}")
            out.backward = True
            (step.loss / accum).backward()
        except Exception as exc:  # quarantined by rank 0, like a raising batch on one rank
            out.failure = exc
            return out
        out.loss = float(step.loss.detach())
        out.parts, out.source_loss, out.source_tokens = step.parts, step.source_loss, step.source_tokens
        out.outside_head = step.outside_head
        return out

    def _reduce(self, local: Micro) -> Micro:
        """Sums the ranks' results; every rank learns whether the micro-batch failed anywhere."""
        started = time.perf_counter()
        w, p, s = self.world, len(PARTS), len(SOURCES)
        v = torch.zeros(w + 2 + 2 * p + 2 * s + 1, dtype=torch.float64)
        v[self.rank] = float(local.failure is not None)
        v[w] = float(local.backward and local.failure is not None)
        v[w + 1] = local.loss
        for i, name in enumerate(PARTS):
            if name in local.parts:
                v[w + 2 + i] = local.parts[name]
                v[w + 2 + p + i] = 1.0
        base = w + 2 + 2 * p
        for i, name in enumerate(SOURCES):
            v[base + i] = local.source_loss.get(name, 0.0)
            v[base + s + i] = local.source_tokens.get(name, 0)
        v[-1] = local.outside_head
        v = v.to(self.comm)
        self._collective(dist.all_reduce, v)
        v = v.cpu()
        self.timers.reduce_s += time.perf_counter() - started
        failed = [r for r in range(w) if v[r] > 0]
        if failed:
            if v[w] > 0:  # partial gradients somewhere: drop the step's accumulation on every rank
                self.optimizer.zero_grad(set_to_none=True)
            cause = local.failure if local.failure is not None else RuntimeError(
                f"the micro-batch raised on rank(s) {failed} (see their log)"
            )  # fmt: skip
            return Micro(failure=cause, backward=bool(v[w] > 0))
        return Micro(
            loss=float(v[w + 1]),
            parts={name: float(v[w + 2 + i]) for i, name in enumerate(PARTS) if v[w + 2 + p + i] > 0},
            source_loss={name: float(v[base + i]) for i, name in enumerate(SOURCES) if v[base + s + i] > 0},
            source_tokens={name: int(v[base + s + i]) for i, name in enumerate(SOURCES) if v[base + s + i] > 0},
            outside_head=int(v[-1]),
        )

    def _apply(self, lr: float, max_grad_norm: float) -> None:
        """Sums gradients over the ranks (a parameter no rank touched keeps no gradient), clips, steps AdamW."""
        started = time.perf_counter()
        params = list(self.model.parameters())
        present = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float32, device=self.device)
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=self.device)
                 for p in params]  # fmt: skip
        flat = torch.cat([*grads, present]).to(self.comm)
        self._collective(dist.all_reduce, flat)
        flat = flat.to(self.device)
        self.timers.allreduce_s += time.perf_counter() - started
        self.timers.steps += 1
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        for p, seen in zip(params, flat[offset:].tolist(), strict=True):
            if seen == 0:
                p.grad = None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _send(self, batch: Batch | None, dst: int) -> None:
        """A slice as two messages (its shapes, then every tensor packed in one int64 buffer): each message costs a
        round of wake-ups on a loaded machine, bytes hardly matter at these sizes."""
        meta = torch.zeros(META, dtype=torch.int64)
        if batch is not None:
            b, s = batch.input_ids.shape
            meta[:7] = torch.tensor([b, s, batch.targets_count, batch.top_ids.shape[1], batch.n_teacher,
                                     batch.n_student, batch.tokens])  # fmt: skip
        self._collective(dist.send, meta.to(self.comm), dst)
        if batch is not None:
            self._collective(dist.send, pack(batch).to(self.comm), dst)

    def _recv(self) -> Batch | None:
        meta = torch.zeros(META, dtype=torch.int64, device=self.comm)
        self._collective(dist.recv, meta, 0)
        b, s, n, k, nt, no, tokens, _ = (int(v) for v in meta.cpu().tolist())
        if b == 0:
            return None
        payload = torch.zeros(packed_size(b, s, n, k, nt + no), dtype=torch.int64, device=self.comm)
        self._collective(dist.recv, payload, 0)
        # On the host: the slice is moved (pinned, on CUDA) with the rest in `_train_slice`.
        return unpack(payload.cpu(), b, s, n, k, nt, no, tokens)


def packed_size(b: int, s: int, n: int, k: int, rows: int) -> int:
    """int64 words of a packed slice: ids (B·S), positions, targets, sources (N each), top ids and top log-probs
    (rows·K each), weights (N); float32 values travel bit for bit, one per word."""
    return b * s + 4 * n + 2 * rows * k


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.int32).to(torch.int64).reshape(-1)


def pack(batch: Batch) -> Tensor:
    """A collated slice in one int64 tensor (see `packed_size` for the layout)."""
    parts = (batch.input_ids, batch.positions, batch.targets, batch.sources, batch.top_ids)
    return torch.cat([*(t.reshape(-1) for t in parts), _bits(batch.top_logprobs), _bits(batch.weights)])


def unpack(payload: Tensor, b: int, s: int, n: int, k: int, nt: int, no: int, tokens: int) -> Batch:
    """The inverse of `pack`."""
    sizes = [b * s, n, n, n, (nt + no) * k, (nt + no) * k, n]
    ids, positions, targets, sources, top_ids, top_bits, weight_bits = torch.split(payload, sizes)
    top_logprobs = top_bits.to(torch.int32).view(torch.float32).reshape(nt + no, k)
    return Batch(
        input_ids=ids.reshape(b, s), positions=positions, targets=targets, n_teacher=nt, n_student=no,
        top_ids=top_ids.reshape(nt + no, k), top_logprobs=top_logprobs, top_valid=torch.isfinite(top_logprobs),
        weights=weight_bits.to(torch.int32).view(torch.float32), tokens=tokens, sources=sources,
    )  # fmt: skip
