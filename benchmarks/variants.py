"""The SAE variants on the embedded model, side by side (issue: variants, item 7).

    python benchmarks/variants.py [--tokens 2000000] [--k 32] [--d-sae 2048] [--cache DIR]

Harvests ``--tokens`` activations with their loss gradients at ``--hook`` once (a
``saekit cache --with-grads`` folder), then trains TopK, g-SAE, Mutual Choice and Feature
Choice, each with AuxK and with aux_zipf, from that cache with the same budget, k and
width. Each is scored on the same held-out tokens (``training/summary.py``); the g-SAE is
scored both without gradients (plain TopK selection) and selecting with them. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hook", default="blocks.5.attn.hook_z")
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--cache", default=None, help="reuse (or create) the activation cache here")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args(argv)

    from saekit.training.config import DataOptions, OptimOptions, RunOptions, TrainConfig
    from saekit.types import SAEConfig
    from saekit.training.run import cache_activations, run_training

    work = Path(args.out or tempfile.mkdtemp(prefix="saekit-variants-"))
    cache = Path(args.cache or work / "cache")
    if not (cache / "meta.json").exists():
        t = time.time()
        cache_activations(DataOptions(hook=args.hook, total_tokens=args.tokens), str(cache), with_grads=True)
        meta = json.loads((cache / "meta.json").read_text())
        print(f"harvested {meta['n_shards'] * meta['shard_tokens']:,} activations with gradients "
              f"in {time.time() - t:.0f} s", flush=True)
    rows = []
    for sparsity in ("topk", "gtopk", "mutual_choice", "feature_choice"):
        for aux in ("auxk", "zipf"):
            cfg = TrainConfig(sae=SAEConfig(d_sae=args.d_sae, k=args.k, sparsity=sparsity),
                              data=DataOptions(hook=args.hook, from_cache=str(cache), total_tokens=args.tokens),
                              optim=OptimOptions(aux=aux, dead_tokens=200_000),
                              run=RunOptions(out=str(work / f"{sparsity}-{aux}"), progress=False, log_every=10**9))
            t = time.time()
            s = run_training(cfg)
            s["seconds"] = time.time() - t
            rows.append((f"{sparsity}", aux, s))  # gtopk: as TopK; summary.json has its with_model_gradients block
            print(json.dumps({"variant": sparsity, "aux": aux, **s}), flush=True)
    print(f"\n{args.hook}, {args.tokens:,} tokens, d_sae {args.d_sae}, k {args.k} (mean L0 target), "
          "held-out eval tokens from saekit's corpus\n")
    print("| variant | aux | explained var. | CE recovered (zero abl., BOS kept) | KL (nats) | dead (training) "
          "| dense | L0 mean ± sd | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, aux, s in rows:
        print(f"| {name} | {aux} | {s['explained_variance']:.3f} | {s['ce_loss_recovered_zero_keep_bos']:.3f} "
              f"| {s['kl']:.4f} | {s['dead_frac']:.3f} | {s['dense_frac']:.3f} "
              f"| {s['l0']:.1f} ± {s['l0_std']:.1f} | {s['seconds']:.0f} |")


if __name__ == "__main__":
    main()
