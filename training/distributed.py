"""Data-parallel training with ``torch.distributed``, launched by ``torchrun``.

    torchrun --nproc-per-node N -m saekit train --hook ...

Nothing here is home-made transport: process groups, all-reduce and all-to-all come from
``torch.distributed`` (gloo on CPU, NCCL on CUDA). The contract:

- **Same result as one process.** Step ``s`` trains on exactly the global batch a single
  process with the same seed would use (``FillReader``); rank ``r`` holds rows
  ``[r·B/N, (r+1)·B/N)`` of it (``ShardedFillReader``). The loss is the single process's
  loss split into per-rank partial sums (the FVU denominator is all-reduced), so the
  all-reduced *sum* of gradients is the single process's gradient up to float rounding.
- **Identical replicas.** Every rank applies the same all-reduced gradient with the same
  Adam, so parameters (and the unit-norm decoder rows) stay bitwise identical; they are
  broadcast from rank 0 at the start and at every checkpoint all the same, so no drift
  can accumulate from a non-deterministic reduction.
- **Dead-latent counters** are updated from all-reduced firing counts, so every rank sees
  the same dead set and AuxK trains the same latents.
- **No hangs on errors.** Every decision that ends the loop (a non-finite loss, a signal,
  a failed checkpoint write) is agreed through a collective, so all ranks stop at the same
  step instead of one rank waiting forever in an all-reduce.
- **Only rank 0 writes** files and logs (with ``--distribute-hooks`` each rank writes the
  folders of the SAEs it owns).

Batch-level sparsifiers (``batch_level``: ``mutual_choice``/``batchtopk``, ``feature_choice``) select across the whole
batch; they are refused under data parallelism with a one-line error (run them in one
process, or spread hooks with ``--distribute-hooks``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from saekit.activations import fill_permutation
from saekit.errors import ConfigError
from saekit.sparsity import ACTIVATIONS
from saekit.training.losses import sum_sq, total_variance
from saekit.types import Batch

log = logging.getLogger("saekit.training.distributed")

# ---- the process group ------------------------------------------------------------------------

def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.elastic) sets these for every worker."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``world`` processes, this one is ``rank``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False  # a process group is initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
        if self.active and requested.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return requested


def init(device: str = "cpu", timeout_s: float = 1800) -> DistContext:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); a plain process gets a
    single-rank context and initialises nothing."""
    if not launched_by_torchrun():
        return DistContext()
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    if rank == 0:  # which transport runs (benchmarks/gpu_check.sh checks for NCCL)
        log.info("process group %s, %d process(es)", dist.get_backend(), world)
    return DistContext(rank, world, local, True)


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(ctx: DistContext, obj=None):
    """Rank 0's ``obj`` on every rank (pickled; for configs, errors and checkpoint states)."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_supported(sparsity: str, batch_size: int, world: int) -> None:
    """Refuse what data parallelism cannot reproduce exactly."""
    if ACTIVATIONS[sparsity].batch_level:
        raise ConfigError(f"--sparsity {sparsity} selects across the whole batch and is not supported "
                          "with data-parallel torchrun; run it in one process or add --distribute-hooks")
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} must be divisible by the {world} torchrun processes")


# ---- collectives used by the trainer ----------------------------------------------------------

class Collective:
    """One process: every reduction is the identity (so the trainer has one code path)."""

    world, rank = 1, 0

    def sum_(self, t: Tensor) -> Tensor:
        return t

    def sum_grads_(self, params) -> None:
        pass

    def broadcast_(self, tensors) -> None:
        pass

    def any(self, flag: bool) -> bool:
        return flag

    def total_variance(self, x: Tensor) -> Tensor:
        """``Σ‖x − mean(x)‖²`` over the global batch (the FVU denominator)."""
        return total_variance(x)

    def mean_rows(self, x: Tensor) -> Tensor:
        return x.mean(0)


class DataParallel(Collective):
    """All-reduces over the default process group; every rank holds ``B/world`` rows."""

    def __init__(self, ctx: DistContext):
        self.world, self.rank = ctx.world, ctx.rank

    def sum_(self, t: Tensor) -> Tensor:
        dist.all_reduce(t)
        return t

    def sum_grads_(self, params) -> None:
        works = []
        for p in params:
            if p.grad is None:  # every rank must enter every all-reduce
                p.grad = torch.zeros_like(p)
            works.append(dist.all_reduce(p.grad, async_op=True))
        for w in works:
            w.wait()

    def broadcast_(self, tensors) -> None:
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t, src=0)

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        return bool(self.sum_(t).item() > 0)

    def total_variance(self, x: Tensor) -> Tensor:
        return self.sum_(sum_sq(x - self.mean_rows(x)))

    def mean_rows(self, x: Tensor) -> Tensor:
        return self.sum_(x.sum(0)) / (len(x) * self.world)  # ranks hold equal row counts

    def _device(self):
        return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


# ---- the sharded data reader ------------------------------------------------------------------

class ShardedFillReader:
    """Rank ``r``'s rows of the global batches of ``FillReader`` (same fills, same permutation).

    Each rank harvests only its share of every fill (``source.fill_part``: a slice of the
    fill's sequences), then one ``all_to_all`` per fill moves every row to the rank whose
    batch slices need it, so a rank holds ``fill/world`` rows instead of the whole fill.
    Sources that read whole fills anyway (a cache, a tensor) skip the exchange."""

    def __init__(self, source, batch_size: int, fill_tokens: int, seed: int, comm: DataParallel):
        if batch_size % comm.world:
            raise ConfigError(f"--batch-size {batch_size} must be divisible by the {comm.world} torchrun processes")
        self.source, self.batch_size, self.seed, self.comm = source, batch_size, seed, comm
        self.per_fill = fill_tokens // batch_size
        self.local = batch_size // comm.world
        self._fill_index, self._mine = -1, None
        self.tokens_filled = 0

    def _needed(self, n: int, f: int, rank: int) -> Tensor:
        """Fill rows rank ``rank`` trains on in fill ``f``, in step order."""
        perm = fill_permutation(n, self.seed, f)[: self.per_fill * self.batch_size]
        return perm.view(self.per_fill, self.comm.world, self.local)[:, rank].flatten()

    def _load(self, f: int) -> Batch:
        """This rank's rows of fill ``f`` in step order; ``x`` and ``grad`` (g-SAE) move
        through the same exchange, so every gradient stays beside its activation."""
        world, rank = self.comm.world, self.comm.rank
        rows, offset, n = self.source.fill_part(f, rank, world)
        n_rows, device = len(rows.x), rows.x.device
        self.tokens_filled += n_rows
        if n_rows == n:  # this rank read the whole fill
            return rows.take(self._needed(n, f, rank))
        spans = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(spans, torch.tensor([offset, n_rows], device=device))
        starts = torch.tensor([int(s[0]) for s in spans])
        send, send_counts = [], []
        for q in range(world):  # rows I own that rank q needs, in q's order
            need = self._needed(n, f, q)
            mine = need[(need >= offset) & (need < offset + n_rows)]
            send.append(mine - offset)
            send_counts.append(len(mine))
        need = self._needed(n, f, rank)
        owner = torch.bucketize(need, starts, right=True) - 1  # rank holding each needed row
        recv_counts = torch.bincount(owner, minlength=world).tolist()
        order = owner.argsort(stable=True)  # received rows come grouped by owner, in need order
        outgoing = rows.take(torch.cat(send))
        return Batch(*(None if t is None else _exchange(t, send_counts, recv_counts, order) for t in outgoing))

    def batch_at(self, step: int) -> Batch:
        f, j = divmod(step, self.per_fill)
        if f != self._fill_index:
            self._mine, self._fill_index = self._load(f), f
        return self._mine.take(slice(j * self.local, (j + 1) * self.local))


def _exchange(rows: Tensor, send_counts: list[int], recv_counts: list[int], order: Tensor) -> Tensor:
    """One ``all_to_all``: send ``rows`` (grouped by destination rank, ``send_counts`` each),
    receive ``sum(recv_counts)`` rows, and put them in need order (``received[i]`` goes to
    row ``order[i]``)."""
    received = rows.new_empty(sum(recv_counts), rows.shape[1])
    dist.all_to_all_single(received, rows, recv_counts, send_counts)
    out = torch.empty_like(received)
    out[order] = received
    return out


def raise_if_any(ctx: DistContext, error: Exception | None) -> None:
    """Raise on every rank the first rank's ``error``, if any rank has one, so a problem seen
    by one rank (an unwritable folder on rank 0) stops them all instead of leaving the
    others waiting in a collective."""
    error = next((e for e in gather_objects(ctx, error) if e is not None), None)
    if error is not None:
        raise error


def gather_objects(ctx: DistContext, obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out
