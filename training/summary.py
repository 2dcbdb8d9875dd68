"""The end-of-run summary: L0, explained variance, dead fraction and CE loss recovered
(zero-ablation baseline, Kissane et al. 2024) on held-out tokens."""

from __future__ import annotations

import torch

from saekit.activations import activation_and_grad, harvest_batches, resolve_hook
from saekit.splice import ce_losses


# What the summary reports of saekit.evals.metrics.reconstruction_stats (eval.json has all).
SUMMARY_STATS = ("l0", "l0_std", "explained_variance", "dense_frac")


def reconstruction_stats(sae, acts: torch.Tensor, grads: torch.Tensor | None = None) -> dict:
    """Mean L0 and its spread over tokens, explained variance (1 − FVU) and the dense
    fraction (latents firing on more than 10% of tokens) on ``acts [n, d_in]``."""
    from saekit.evals.metrics import reconstruction_stats as full

    return {k: v for k, v in full(sae, acts, grads).items() if k in SUMMARY_STATS}


def eval_tokens(model, cfg) -> torch.Tensor:
    """Held-out token sequences: saekit's held-out corpus stream, or the start of the
    user's own source (which the run may also have trained on)."""
    from saekit import data

    d = cfg.data
    n_seq = max(1, cfg.run.eval_tokens // (d.seq_len - 1))
    split = "heldout" if d.dataset in (None, "saekit") else "train"
    seqs = data.pack(data.documents(d.dataset, cfg.run.seed + 1, split), model.tokenizer, d.seq_len)
    return torch.stack([next(seqs) for _ in range(n_seq)])


def summarize(sae, trainer, cfg, model=None) -> dict:
    from saekit.models import load_model

    sae.eval()
    dead_frac = trainer.dead_mask().float().mean().item()
    if model is None:  # trained from a cache: the model is only needed for the summary
        model = load_model(cfg.data.model, cfg.data.device)
    tokens = eval_tokens(model, cfg)
    hook = resolve_hook(model, sae.cfg.hook_name)
    acts = harvest_batches(model, tokens, hook)
    stats = reconstruction_stats(sae, acts.to(sae.W_dec.device))
    ce = ce_losses(model, sae, tokens)
    from saekit.kernels import resolve_impl

    summary = {**stats, "dead_frac": dead_frac, "impl": resolve_impl(sae.cfg.impl, sae.W_dec.device),
               "ce_loss_clean": ce.clean, "ce_loss_sae": ce.sae, "kl": ce.kl, "ce_loss_zero_ablation": ce.zero, "ce_loss_recovered": ce.recovered,
               "eval_tokens": len(acts), "steps": trainer.step, "hook": sae.cfg.hook_name,
               "d_sae": sae.cfg.d_sae, "k": sae.cfg.k}
    if sae.cfg.sparsity == "gtopk":  # also evaluate selecting with the loss gradients
        pairs = [activation_and_grad(model, tokens[i: i + 32], hook) for i in range(0, len(tokens), 32)]
        grads = torch.cat([g for _, g in pairs])  # [n, T, *shape]
        flat_g = sae.flatten_hook(grads[:, 1:]).reshape(-1, sae.cfg.d_in).float()
        with_g = reconstruction_stats(sae, acts.to(sae.W_dec.device), flat_g.to(sae.W_dec.device))
        ce_g = ce_losses(model, sae, tokens, grads=grads)
        summary["with_grads"] = {**with_g, "ce_loss_sae": ce_g.sae, "kl": ce_g.kl,
                                 "ce_loss_recovered": ce_g.recovered}
    return summary
