"""The TopK encoder's forward on CPU: the fp32 path (impl="torch") against the bf16 screen
(impl="screen", kernels/screen.py), over a grid of shapes.

    python benchmarks/screen.py [--reps 5]

Random data (x ~ N(0, 1), W_enc columns ~ N(0, 1/d_in), stored as saekit.SAE stores them),
no autograd. The two are timed in turns, round after round (medians), so the machine's drift
hits both alike. Also prints the screen's candidates per row (what it rescores in fp32) and
whether impl="auto" takes the screen at that shape on this machine. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_timing import interleaved_times

from saekit.kernels import encode_topk, screen
from saekit.kernels.encoder import encoder_impl

SHAPES = [  # B, d_in, d_sae, k
    (4096, 768, 12288, 32), (4096, 768, 24576, 64), (4096, 768, 12288, 128),
    (4096, 256, 4096, 32), (4096, 256, 2048, 32), (1024, 256, 2048, 16),
    (512, 512, 2048, 32), (4096, 64, 1024, 8),
]


def candidates_per_row(x, W_enc, b_enc, b_dec, k) -> float:
    """Mean number of latents a row the screen rescores in fp32."""
    xc = x - b_dec
    Wa = torch.zeros(W_enc.shape[1], screen._padded_k(x.shape[1]), dtype=torch.bfloat16)
    xa = torch.zeros(len(x), Wa.shape[1], dtype=torch.bfloat16)
    E = screen._row_bounds(xc, xa, screen._column_bounds(W_enc.t(), b_enc, Wa))
    rows, _, _ = screen._candidates(xa @ Wa.t(), k, E)
    return len(rows) / len(x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    print(f"threads={torch.get_num_threads()} AMX={screen.amx_available()}")
    print("| B | d_in | d_sae | k | torch (ms) | screen (ms) | screen / torch | candidates a row | auto takes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, d_in, d_sae, k in SHAPES:
        x = torch.randn(B, d_in, generator=g)
        W_enc = (torch.randn(d_sae, d_in, generator=g) / d_in**0.5).t()  # [d_in, d_sae] view of rows
        b_enc, b_dec = torch.zeros(d_sae), torch.zeros(d_in)
        fns = {impl: (lambda impl=impl: encode_topk(x, W_enc, b_enc, b_dec, k, impl=impl))
               for impl in ("torch", "screen")}
        t = {name: statistics.median(v) * 1e3 for name, v in interleaved_times(fns, args.reps).items()}
        cands = candidates_per_row(x, W_enc, b_enc, b_dec, k)
        auto = encoder_impl("auto", x, W_enc, k)
        print(f"| {B} | {d_in} | {d_sae} | {k} | {t['torch']:.1f} | {t['screen']:.1f} | "
              f"{t['screen'] / t['torch']:.2f} | {cands:.0f} | {auto} |")


if __name__ == "__main__":
    main()
