"""How the CPU training step scales: with d_sae, k, batch size, and 1 vs 2 ranks.

    python benchmarks/scaling.py            # all sweeps (~5 min on 2 cores)
    python benchmarks/scaling.py --quick    # fewer points

Each row times ``Trainer.train_step`` (TopK, AuxK idle: forward, backward, all-reduce,
Adam, decoder renormalization) on random activations: the median and the fastest of
``--reps`` steps after one warm-up (on a shared machine the fastest is the better guide
to cost; the median shows the contention). The rank rows run the same global batch as one process with all threads and
as two ``torchrun`` processes (gloo) with one thread each: the same cores, split by
data parallelism instead of by BLAS threads. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import torch
from bench_timing import run_times


def make_trainer(d_in: int, d_sae: int, k: int, batch: int, comm=None):
    from saekit.sae import SAE, SAEConfig
    from saekit.training.config import DataOptions, OptimOptions, RunOptions, TrainConfig
    from saekit.training.trainer import Trainer

    cfg = TrainConfig(sae=SAEConfig(d_sae=d_sae, k=k),
                      data=DataOptions(batch_size=batch, total_tokens=batch * 10**6, fill_tokens=batch),
                      optim=OptimOptions(lr=1e-4, warmup_steps=0), run=RunOptions(progress=False))
    return Trainer(SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k), seed=0), cfg, 10**6, comm)


def step_time(d_in: int, d_sae: int, k: int, batch: int, reps: int, comm=None, rank: int = 0,
              world: int = 1) -> tuple[float, float]:
    """(median, fastest) seconds of a training step."""
    torch.manual_seed(rank)
    x = torch.randn(batch // world, d_in)  # this rank's rows of the global batch
    trainer = make_trainer(d_in, d_sae, k, batch, comm)
    times = run_times(lambda: trainer.train_step(x), reps, warmup=1)
    if comm is not None:  # a step lasts until the slowest rank is done
        import torch.distributed as dist

        slowest = torch.tensor(times)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times = slowest.tolist()
    return statistics.median(times), min(times)


def state_mib(d_in: int, d_sae: int, batch: int) -> float:
    """Parameters, gradients and Adam's two moments (fp32), plus the [batch, d_sae]
    pre-activation matrix the CPU encoder builds."""
    params = 2 * d_in * d_sae + d_sae + d_in
    return (4 * params + batch * d_sae) * 4 / 2**20


def ddp_worker(args) -> None:
    """Run under torchrun: time the data-parallel step, rank 0 prints seconds."""
    from saekit.training import distributed

    ctx = distributed.init("cpu")
    t = step_time(args.d_in, args.d_sae, args.k, args.batch, args.reps,
                  distributed.DataParallel(ctx), ctx.rank, ctx.world)
    if ctx.is_main:
        print(f"SECONDS {t[0]} {t[1]}")
    distributed.shutdown(ctx)


def two_ranks(args, d_sae: int, k: int, batch: int) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, "--ddp-worker", "--d-in", str(args.d_in), "--d-sae", str(d_sae), "--k", str(k),
           "--batch", str(batch), "--reps", str(args.reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    med, fast = next(l for l in out.splitlines() if l.startswith("SECONDS")).split()[1:]
    return float(med), float(fast)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(args)

    d_saes = [4096, 16384, 65536] if args.quick else [4096, 8192, 16384, 32768, 65536]
    ks = [16, 64] if args.quick else [16, 32, 64, 128]
    batches = [256, 4096] if args.quick else [256, 1024, 4096]
    rows = []

    def add(sweep, d_sae, k, batch, ranks, t):
        rows.append((sweep, d_sae, k, batch, ranks, *t, batch / t[1], state_mib(args.d_in, d_sae, batch)))
        print(f"  {sweep}: d_sae={d_sae} k={k} batch={batch} ranks={ranks}: {t[0]:.3f} / {t[1]:.3f} s",
              file=sys.stderr, flush=True)

    for d_sae in d_saes:
        add("d_sae", d_sae, args.k, args.batch, 1, step_time(args.d_in, d_sae, args.k, args.batch, args.reps))
    for k in ks:
        add("k", args.d_sae, k, args.batch, 1, step_time(args.d_in, args.d_sae, k, args.batch, args.reps))
    for b in batches:
        add("batch", args.d_sae, args.k, b, 1, step_time(args.d_in, args.d_sae, args.k, b, args.reps))
    for b in (1024, 4096):
        add("ranks", args.d_sae, args.k, b, 1, step_time(args.d_in, args.d_sae, args.k, b, args.reps))
        add("ranks", args.d_sae, args.k, b, 2, two_ranks(args, args.d_sae, args.k, b))

    print(f"d_in {args.d_in}, TopK, {torch.get_num_threads()} threads (2 ranks: "
          f"{max(1, torch.get_num_threads() // 2)} each), torch {torch.__version__}")
    print("| sweep | d_sae | k | batch | ranks | step median (s) | step fastest (s) | tokens/s (fastest) "
          "| SAE state + pre-acts (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sweep, d_sae, k, b, ranks, med, fast, tps, mib in rows:
        print(f"| {sweep} | {d_sae} | {k} | {b} | {ranks} | {med:.3f} | {fast:.3f} | {tps:,.0f} | {mib:,.0f} |")


if __name__ == "__main__":
    main()
