"""Harvesting throughput at a hook against a bare forward pass to that layer.

    python benchmarks/harvest.py [--hook blocks.5.attn.hook_z] [--model M] [--dtype bfloat16]

Rows: the bare forward through blocks 0..L (``stop_at_layer=L+1``, no hooks), the full
forward, and saekit's harvest (``saekit.activations.harvest``: hook, stop as soon as it
fires, drop BOS, flatten), and the harvest of (x, ∂L/∂x) pairs for g-SAEs (full forward,
summed next-token loss, backward to the hook only). Targets: harvest ≤ 1.15× the bare
forward; with gradients ≤ 3.5× the harvest without.
"""

from __future__ import annotations

import argparse
import re
import statistics

import torch
from bench_timing import run_times


def median_time(fn, reps: int) -> float:
    return statistics.median(run_times(fn, reps))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hook", default="blocks.5.attn.hook_z")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the model's dtype (benchmarks/precision.py compares them side by side)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    from saekit import data
    from saekit.activations import harvest, harvest_with_grads, resolve_hook
    from saekit.models import load_model

    model = load_model(args.model, "cpu", args.dtype)
    hook = resolve_hook(model, args.hook)
    layer = int(re.match(r"blocks\.(\d+)\.", args.hook).group(1))
    tokens = next(data.token_batches(model.tokenizer, None, args.seq_len, args.batch))
    n = tokens.numel()
    with torch.no_grad():
        t_bare = median_time(lambda: model(tokens, stop_at_layer=layer + 1), args.reps)
        t_full = median_time(lambda: model(tokens), args.reps)
    t_harvest = median_time(lambda: harvest(model, tokens, hook), args.reps)
    t_grads = median_time(lambda: harvest_with_grads(model, tokens, hook), args.reps)
    print(f"| {args.hook}, batch {args.batch}×{args.seq_len}, {args.dtype}, {torch.get_num_threads()} threads "
          "| seconds | tokens/s | × bare |\n|---|---|---|---|")
    for name, t in [(f"bare forward to layer {layer}", t_bare), ("full forward", t_full),
                    ("saekit harvest", t_harvest), ("saekit harvest with gradients (g-SAE)", t_grads)]:
        print(f"| {name} | {t:.4f} | {n / t:,.0f} | {t / t_bare:.2f} |")
    print(f"with gradients / without: {t_grads / t_harvest:.2f}x")


if __name__ == "__main__":
    main()
