"""Time one full SAE training step on CPU against the floor every exact TopK SAE pays.

    python benchmarks/train_step.py --d-in 768 --d-sae 12288 --k 32 --batch 4096

The step is the trainer's own (``saekit.training.trainer.Trainer.train_step``): encode,
decode, loss, backward, parallel-gradient removal, Adam, decoder renormalization. The
floor is the single dense encoder product ``(x − b_dec) @ W_enc + b_enc`` that any exact
TopK SAE must compute, written into a reused buffer (a fresh 200 MB output would add page
faults to the floor and flatter the ratio), with W_enc stored either way round; the faster
counts. The floors and the step are timed in turns, round after round (medians), so that the
machine's drift hits them alike; with ``--sparsity`` other than topk, a TopK step of the same
shape joins the rounds and the table gives the step's time over TopK's. Prints a table; the last line is
``tokens_per_s=<n> floor_tokens_per_s=<n>``.

On a CPU with AMX the default step (``impl="auto"``) takes the screened encoder
(kernels/screen.py; TopK, Mutual and Feature Choice): it ranks latents through a bf16 product and
recomputes in fp32 the candidates its error bound keeps (~2k a row), so it no longer
computes the fp32 product the floor times. Its selection is still the exact top k of fp32
pre-activations. The same rounds then also time the step with ``impl="torch"`` (the fp32
product) and, for TopK, the bf16 product alone, so all are in the table.
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch
from bench_timing import interleaved_times


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=12288)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--sparsity", default="topk")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dead-frac", type=float, default=0.0,
                    help="mark this share of latents dead so the AuxK path runs too")
    ap.add_argument("--impl", default="auto", choices=["auto", "torch", "screen"],
                    help="the step's kernels (auto: the screened encoder on CPUs with AMX)")
    args = ap.parse_args(argv)

    from saekit.kernels import screen
    from saekit.kernels.encoder import encoder_impl
    from saekit.sae import SAE, SAEConfig
    from saekit.training.config import DataOptions, OptimOptions, RunOptions, TrainConfig
    from saekit.training.trainer import Trainer

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    grad = torch.randn(args.batch, args.d_in) if args.sparsity == "gtopk" else None  # g-SAE selects with it

    def make(sparsity, impl=args.impl):
        sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, sparsity=sparsity, impl=impl), seed=0)
        cfg = TrainConfig(sae=SAEConfig(d_sae=args.d_sae, k=args.k, sparsity=sparsity, impl=impl),
                          data=DataOptions(batch_size=args.batch, total_tokens=args.batch * 10**6,
                                           fill_tokens=args.batch),
                          optim=OptimOptions(lr=1e-4, warmup_steps=0), run=RunOptions(progress=False))
        return sae, cfg, Trainer(sae, cfg, total_steps=10**6)

    sae, cfg, trainer = make(args.sparsity)
    # Another sparsifier's step is compared with a TopK step timed in the same rounds.
    topk = make("topk")[2] if args.sparsity != "topk" else None
    topk_screens = encoder_impl(args.impl, x, sae.W_enc, args.k) == "screen"
    screened = topk_screens and args.sparsity != "gtopk"  # the selections that screen
    encoder = "screen" if screened else "fp32 pre-activations"
    plain = make(args.sparsity, "torch")[2] if screened else None  # the same step on the fp32 product
    # ... and another sparsifier is compared with the TopK step on the fp32 product as well
    topk_plain = make("topk", "torch")[2] if topk is not None and topk_screens else None

    pre = torch.empty(args.batch, args.d_sae)
    # The SAE stores W_enc transposed ([d_sae, d_in] rows); the floor is timed with both
    # storage orders and the faster one counts, so the layout cannot flatter the ratio.
    layouts = {"W_enc as [d_sae, d_in] rows": sae.W_enc.detach(),
               "W_enc as [d_in, d_sae] rows": sae.W_enc.detach().contiguous()}

    def floor_with(W):  # into a reused buffer: the fastest way to compute the product here
        def floor():
            with torch.no_grad():
                torch.addmm(sae.b_enc, x - sae.b_dec, W, out=pre)
        return floor

    def stepper(t: Trainer):
        def step():
            if args.dead_frac:  # the same latents dead at every step
                t.tokens_since_fired[: int(args.dead_frac * args.d_sae)] = cfg.optim.dead_tokens
            t.train_step(x, grad)
        return step

    step = stepper(trainer)

    rss0 = peak_rss_mib()
    fns = {**{name: floor_with(W) for name, W in layouts.items()}, "step": step}
    if topk is not None:
        fns["topk"] = lambda: topk.train_step(x)
    if topk_plain is not None:
        fns["topk_plain"] = lambda: topk_plain.train_step(x)
    if screened:
        fns["plain"] = stepper(plain)
        if args.sparsity == "topk":
            fns["bf16"] = bf16_product(screen, x - sae.b_dec, sae)
    times = {name: statistics.median(t) for name, t in interleaved_times(fns, args.reps, warmup=2).items()}
    t_step = times.pop("step")
    t_topk = times.pop("topk", None)
    t_topk_plain = times.pop("topk_plain", None)
    t_plain, t_bf16 = times.pop("plain", None), times.pop("bf16", None)
    t_layouts = times
    t_floor = min(t_layouts.values())
    rss1 = peak_rss_mib()
    params_mib = sum(p.numel() for p in sae.parameters()) * 4 / 2**20
    rows = [
        ("threads", torch.get_num_threads()),
        ("shape", f"d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} {args.sparsity}"),
        *((f"dense encoder matmul, {name} (s)", f"{t:.4f}") for name, t in t_layouts.items()),
        ("floor: the faster of the two (s)", f"{t_floor:.4f}"),
        ("encoder (impl=" + args.impl + ")", encoder),
        ("full training step (s)", f"{t_step:.4f}"),
        ("step / floor tokens per s", f"{t_floor / t_step:.2f}"),
        *([("the screen's bf16 product [B, d_in+pad] @ [d_in+pad, d_sae] (s)", f"{t_bf16:.4f}")]
          if t_bf16 is not None else []),
        *([("step with impl=torch: the fp32 product (s)", f"{t_plain:.4f}"),
           ("impl=torch step / floor tokens per s", f"{t_floor / t_plain:.2f}")] if screened else []),
        *([("TopK step, same rounds (s)", f"{t_topk:.4f}"), ("step time / TopK step time", f"{t_step / t_topk:.2f}")]
          if t_topk is not None else []),
        *([("TopK step with impl=torch (the fp32 product), same rounds (s)", f"{t_topk_plain:.4f}"),
           ("step time / impl=torch TopK step time", f"{t_step / t_topk_plain:.2f}")]
          if t_topk_plain is not None else []),
        ("SAE parameters (MiB)", f"{params_mib:.0f}"),
        ("peak RSS growth during timing (MiB)", f"{rss1 - rss0:.0f}"),
        ("peak RSS of the process (MiB)", f"{rss1:.0f}"),
    ]
    w = max(len(r[0]) for r in rows)
    print("| measure | value |\n|---|---|")
    for name, v in rows:
        print(f"| {name:<{w}} | {v} |")
    extra = f" topk_tokens_per_s={args.batch / t_topk:.0f}" if t_topk is not None else ""
    print(f"tokens_per_s={args.batch / t_step:.0f} floor_tokens_per_s={args.batch / t_floor:.0f}{extra}")


def bf16_product(screen, xc, sae):
    """The screen's matmul alone, on buffers laid out as screened_select lays them out."""
    K = screen._padded_k(xc.shape[1])
    Wa = torch.zeros(sae.cfg.d_sae, K, dtype=torch.bfloat16)
    xa = torch.zeros(len(xc), K, dtype=torch.bfloat16)
    with torch.no_grad():
        Wa[:, : xc.shape[1]].copy_(sae.W_enc_T)
        xa[:, : xc.shape[1]].copy_(xc)
    out = torch.empty(len(xc), sae.cfg.d_sae, dtype=torch.bfloat16)
    return lambda: torch.mm(xa, Wa.t(), out=out)


if __name__ == "__main__":
    main()
