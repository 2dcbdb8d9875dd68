"""CPU timings of saekit.kernels' torch path against the alternatives and the dense floor.

    python benchmarks/cpu_kernels.py [--batch 4096 --d-in 768 --d-sae 12288 --k 32 --reps 5]

Prints two tables: (1) each sparse primitive and batch-level selection (Mutual and Feature
Choice) next to the alternatives it was chosen over;
(2) a TopK SAE training step (encode -> decode -> FVU loss -> backward -> fused Adam) against
one dense `x @ W_enc` matmul, the floor the CPU trainer is held to (>= 75% of its tokens/s).
Times are min and median over --reps after one warm-up; the min is the better estimate on a
shared machine. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench_timing import run_times

from saekit.kernels import decode_sparse, encode_topk
from saekit.kernels.select import column_topk, global_topk, topk_lower_index
from saekit.kernels.sparse_rows import gather_rows_torch, row_dot_torch, scatter_rows_torch


def timeit(fn, reps: int) -> tuple[float, float]:
    """(min, median) milliseconds."""
    ts = run_times(fn, reps)
    return min(ts) * 1e3, statistics.median(ts) * 1e3


def primitives(B: int, d_in: int, d_sae: int, k: int, reps: int) -> list[tuple[str, str, float, float]]:
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(B, d_sae, generator=g)
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(B)])
    w = torch.randn(B, k, generator=g)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    dense = torch.randn(B, d_in, generator=g)
    rows = []

    def add(op, name, fn):
        rows.append((op, name, *timeit(fn, reps)))

    add("top-k", "torch.topk (ties arbitrary)", lambda: pre.topk(k, dim=1))
    add("top-k", "topk_lower_index (exact ties) *", lambda: topk_lower_index(pre, k))
    n = k * B  # Mutual Choice keeps the batch's k·B largest; Feature Choice ~k·B/d_sae per latent
    m = torch.full((d_sae,), max(1, round(n / d_sae)))
    add("batch top-k·B", "torch.topk of the flattened matrix", lambda: pre.reshape(-1).topk(n, sorted=False))
    add("batch top-k·B", "global_topk *", lambda: global_topk(pre, n))
    add("per-column top-m", "torch.topk(dim=0)", lambda: pre.topk(int(m.max()), dim=0))
    add("per-column top-m", "column_topk *", lambda: column_topk(pre, m))
    add("gather_rows", "embedding_bag *", lambda: gather_rows_torch(idx, w, W_dec))
    add("gather_rows", "W_dec[idx] * w, sum", lambda: (W_dec[idx] * w[..., None]).sum(1))
    add("row_dot", "sampled_addmm *", lambda: row_dot_torch(idx, dense, W_dec))
    add("row_dot", "einsum over W_dec[idx]", lambda: torch.einsum("bkd,bd->bk", W_dec[idx], dense))

    def psw_backward():
        v = w.clone().requires_grad_()
        out = F.embedding_bag(idx, W_dec, per_sample_weights=v, mode="sum")
        return torch.autograd.grad(out, v, dense)[0]

    add("row_dot", "embedding_bag backward", psw_backward)
    add("scatter_rows", "sort + embedding_bag *", lambda: scatter_rows_torch(idx, w, dense, d_sae))
    add("scatter_rows", "index_add_ of [B*k, D]", lambda: torch.zeros(d_sae, d_in).index_add_(
        0, idx.reshape(-1), (w[..., None] * dense[:, None]).reshape(-1, d_in)))

    def coo_mm():
        r = torch.arange(B).repeat_interleave(k)
        sp = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), r]), w.reshape(-1), (d_sae, B),
                                     check_invariants=False)
        return torch.sparse.mm(sp, dense)

    add("scatter_rows", "sparse COO mm", coo_mm)
    return rows


def training_step(B: int, d_in: int, d_sae: int, k: int, reps: int,
                  linear_layout: bool) -> dict[str, tuple[float, float]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d_in, generator=g)
    W_dec = torch.nn.Parameter(F.normalize(torch.randn(d_sae, d_in, generator=g), dim=1))
    # W_enc starts as W_dec^T. Stored either as a row-major [d_in, d_sae] parameter (SAELens)
    # or as a contiguous [d_sae, d_in] parameter used through .t() (nn.Linear's layout): the
    # kernels build grad W_enc as [d_sae, d_in] rows, so the second layout skips a 37 MB
    # transposed copy and keeps fused Adam on contiguous tensors.
    enc = torch.nn.Parameter(W_dec.detach().clone() if linear_layout else W_dec.detach().t().contiguous())
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(x.mean(0))
    opt = torch.optim.Adam([enc, b_enc, W_dec, b_dec], lr=1e-4, fused=True)
    denom = (x - x.mean(0)).pow(2).sum()
    state = {}

    def forward():
        W_enc = enc.t() if linear_layout else enc  # [d_in, d_sae]
        top = encode_topk(x, W_enc, b_enc, b_dec, k, impl="torch")
        x_hat = decode_sparse(top.values, top.indices, W_dec, b_dec, impl="torch")
        state["loss"] = (x_hat - x).pow(2).sum() / denom

    def backward():
        state["loss"].backward()

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Interleave the dense floor with the phases of a step, so that a busy neighbour slows
    # both alike: each rep times floor, forward, backward, Adam back to back.
    xf = torch.randn(B, d_in, generator=g)
    Wf = torch.randn(d_in, d_sae, generator=g)
    rows = {"floor": [], "forward": [], "backward": [], "adam": []}
    for rep in range(reps + 1):
        for name, fn in (("floor", lambda: xf @ Wf), ("forward", forward), ("backward", backward), ("adam", step)):
            t0 = time.perf_counter()
            fn()
            if rep:  # rep 0 warms up
                rows[name].append((time.perf_counter() - t0) * 1e3)
    rows["step"] = [f + b + a for f, b, a in zip(rows["forward"], rows["backward"], rows["adam"])]
    out = {name: (min(ts), statistics.median(ts)) for name, ts in rows.items()}
    out["ratio"] = statistics.median(f / s for f, s in zip(rows["floor"], rows["step"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=12288)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-primitives", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    B, d_in, d_sae, k = a.batch, a.d_in, a.d_sae, a.k
    print(f"# B={B} d_in={d_in} d_sae={d_sae} k={k} threads={torch.get_num_threads()} torch {torch.__version__}")

    if not a.skip_primitives:
        print("\n| op | implementation (* = used) | min ms | median ms |\n|---|---|---|---|")
        for op, name, mn, med in primitives(B, d_in, d_sae, k, a.reps):
            print(f"| {op} | {name} | {mn:.1f} | {med:.1f} |")

    print("\n| part (ms) | W_enc layout | min | median | step tokens/s (median) "
          "| floor / step (median of paired reps) |")
    print("|---|---|---|---|---|---|")
    for linear_layout in (False, True):
        layout = "[d_sae, d_in] param, .t()" if linear_layout else "row-major [d_in, d_sae]"
        r = training_step(B, d_in, d_sae, k, a.reps, linear_layout)
        for part in ("floor", "forward", "backward", "adam", "step"):
            mn, med = r[part]
            name = "dense floor `x @ W_enc`" if part == "floor" else part
            tps = f"{B / med * 1e3:,.0f}" if part in ("step", "floor") else ""
            ratio = f"{r['ratio']:.0%}" if part == "step" else ""
            print(f"| {name} | {layout} | {mn:.1f} | {med:.1f} | {tps} | {ratio} |")


if __name__ == "__main__":
    main()
