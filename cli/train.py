"""`saekit train` and `saekit cache`: their options are training.config's dataclasses."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class CacheOptions:
    """Where to write the activation cache."""

    out: str = "runs/cache"
    """Folder for the safetensors shards and meta.json."""
    seed: int = 0
    """Seed of the token stream."""
    with_grads: bool = False
    """Also store the loss gradient at the hook (for --sparsity gtopk)."""


def cmd_train(args) -> None:
    """Train an SAE at a hook point (default: the embedded model and corpus)."""
    from saekit.training.run import run_training

    cfg = args.train
    summary = run_training(cfg)
    if summary and "hook" not in summary:  # several hooks: {hook: summary}
        for name, s in summary.items():
            print(format_summary(s, f"{cfg.run.out}/{name}"))
    elif summary or os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(format_summary(summary, cfg.run.out))


def format_summary(summary: dict, out: str) -> str:
    if not summary:
        return f"saved to {out}"
    k = "" if summary["k"] is None else f", k {summary['k']}"  # None: an elementwise SAE selects no k
    return (f"SAE at {summary['hook']} (d_sae {summary['d_sae']}{k}), "
            f"{summary['eval_tokens']} held-out tokens:\n"
            f"  L0 {summary['l0']:.1f}  explained variance {summary['explained_variance']:.3f}  "
            f"dead fraction (training) {summary['dead_frac']:.3f}\n"
            f"  CE loss clean {summary['ce_loss_clean']:.3f}  with SAE {summary['ce_loss_sae']:.3f}  "
            f"recovered {summary['ce_loss_recovered_mean']:.3f} (mean abl.) "
            f"{summary['ce_loss_recovered_zero_all']:.3f} (zero abl., all positions) "
            f"{summary['ce_loss_recovered_zero_keep_bos']:.3f} (zero abl., BOS kept)\n"
            f"saved to {out}")


def cmd_cache(args) -> None:
    """Harvest activations at a hook into safetensors shards for `saekit train --from-cache`."""
    from saekit.training.run import cache_activations

    path = cache_activations(args.data, args.cache.out, args.cache.seed, with_grads=args.cache.with_grads)
    print(f"cached activations in {path}")


def _train_groups():
    from saekit.training.config import TrainConfig

    return [(TrainConfig, "train")]


def _cache_groups():
    from saekit.training.config import DataOptions

    return [(DataOptions, "data"), (CacheOptions, "cache")]


COMMANDS = {"train": (cmd_train, _train_groups), "cache": (cmd_cache, _cache_groups)}
