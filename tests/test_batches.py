"""The data path carries activations and their loss gradients side by side (``Batch``): every
reader that shuffles or moves rows must keep each gradient row beside its activation row.

The data is built so a row's gradient is a known function of its activation
(``grad = 3·x + row id``), so a gradient that slipped to another row is caught."""

import torch
import torch.multiprocessing as mp

from saekit.activations import CachedActivations, TensorActivations, fill_permutation, write_cache
from saekit.training.trainer import FillReader
from saekit.types import Batch

N, D_IN, BATCH = 64, 5, 16


def rows_with_grads(seed: int = 0) -> Batch:
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))
    return Batch(x, 3 * x + torch.arange(N, dtype=torch.float32)[:, None])


def assert_in_step(batch: Batch, data: Batch) -> None:
    """Each row of ``batch`` is one row of ``data``: its x and its grad from the same row."""
    ids = (batch.grad - 3 * batch.x)[:, 0].round().long()
    assert torch.equal(batch.x, data.x[ids]) and torch.equal(batch.grad, data.grad[ids])


def test_fill_reader_shuffles_x_and_grad_with_one_permutation():
    data = rows_with_grads()
    reader = FillReader(TensorActivations(data.x, N, data.grad), BATCH, N, seed=7)
    perm = fill_permutation(N, 7, 0)
    for step in range(N // BATCH):
        b = reader.batch_at(step)
        assert_in_step(b, data)
        assert torch.equal(b.x, data.x[perm[step * BATCH: (step + 1) * BATCH]])  # the one shuffle
    assert sorted(torch.cat([reader.batch_at(s).x for s in range(N // BATCH)]).sum(1).tolist()) == \
        sorted(data.x.sum(1).tolist())  # a fill's batches hold each row once


def test_fill_reader_without_gradients_gives_none():
    data = rows_with_grads()
    b = FillReader(TensorActivations(data.x, N), BATCH, N, seed=0).batch_at(1)
    assert b.grad is None and b.x.shape == (BATCH, D_IN)


def test_cache_round_trip_keeps_gradients_beside_activations(tmp_path):
    data = rows_with_grads()
    meta = {"hook_name": "h", "hook_shape": [D_IN], "d_in": D_IN, "model_name": "", "with_grads": True}
    write_cache(TensorActivations(data.x, N // 2, data.grad), tmp_path / "c", 2, meta)
    cache = CachedActivations(tmp_path / "c")
    shards = [cache.fill(i) for i in range(2)]
    assert torch.equal(torch.cat([s.x for s in shards]), data.x)
    assert torch.equal(torch.cat([s.grad for s in shards]), data.grad)
    write_cache(TensorActivations(data.x, N), tmp_path / "plain", 1, {**meta, "with_grads": False})
    assert CachedActivations(tmp_path / "plain").fill(0).grad is None


class _SplitSource:
    """Fills of ``rows_with_grads(seed=fill)``; a rank harvests only its slice of rows, as a
    model source under data parallelism does, so the reader must exchange rows."""

    def fill(self, f):
        return rows_with_grads(f)

    def fill_part(self, f, rank, world):
        sizes = [N // world] * world
        return self.fill(f).take(slice(rank * sizes[0], (rank + 1) * sizes[0])), rank * sizes[0], N


def _sharded_worker(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist

    from saekit.training.distributed import DataParallel, DistContext, ShardedFillReader

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        comm = DataParallel(DistContext(rank, world, rank, True))
        sharded = ShardedFillReader(_SplitSource(), BATCH, N, seed=3, comm=comm)
        whole = FillReader(_SplitSource(), BATCH, N, seed=3)
        local = BATCH // world
        for step in range(2 * N // BATCH):  # two fills
            got, want = sharded.batch_at(step), whole.batch_at(step).take(slice(rank * local, (rank + 1) * local))
            assert torch.equal(got.x, want.x) and torch.equal(got.grad, want.grad), step
            assert_in_step(got, rows_with_grads(step * BATCH // N))
    finally:
        dist.destroy_process_group()


def test_sharded_reader_exchanges_x_and_grad_together(tmp_path):
    """Two gloo ranks, each harvesting half of every fill: after the all-to-all each holds
    exactly its slice of the one-process batch, gradients beside their activations."""
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
