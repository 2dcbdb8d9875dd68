"""``saekit eval``'s standard SAE metrics (methods.md §8) of one SAE on tokens: L0, FVU /
explained variance, CE loss recovered against zero ablation (of the spliced positions, and
of every position as Kissane et al. report it) and mean ablation, KL of the spliced model,
the never-fired and dense fractions, the firing-frequency histogram and the per-token L0
spread. ``saekit eval`` writes them as ``eval.json`` beside the SAE, with an HTML report.
The metrics themselves are computed by ``saekit.metrics`` (shared with the end-of-run
summary); the losses by ``saekit.splice``.

``never_fired_frac`` is measured on the evaluation tokens; it is not the training run's
``dead_frac`` (summary.json, metrics.jsonl: latents the trainer's counters found silent for
``dead_tokens`` tokens)."""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.activations import harvest_batches, resolve_hook
from saekit.metrics import reconstruction_stats
from saekit.splice import ce_losses, check_sae_fits, with_model_gradients


@torch.no_grad()
def evaluate_sae(model, sae, tokens: Tensor, batch_size: int = 32) -> dict:
    """Every §8 metric of ``sae`` on ``tokens [n, T]`` (BOS positions excluded, as in training)."""
    sae.cfg = check_sae_fits(model, sae)
    hook = resolve_hook(model, sae.cfg.hook_name)
    acts = harvest_batches(model, tokens, hook, batch_size)  # [n·(T−1), d_in]
    stats = reconstruction_stats(sae, acts)
    mean = sae.unflatten_hook(acts.mean(0))
    ce = ce_losses(model, sae, tokens, batch_size, mean=mean)
    out = {**stats, **ce.as_dict(),
           "hook": sae.cfg.hook_name, "d_sae": sae.cfg.d_sae, "k": sae.cfg.selected_k, "sparsity": sae.cfg.sparsity}
    if type(sae.sparsifier).uses_grad:  # the main figures are its label-free rule, TopK (methods.md §5)
        out["with_model_gradients"] = with_model_gradients(model, sae, tokens, batch_size)
    return out
