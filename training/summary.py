"""The end-of-run summary: L0, explained variance, dead fraction and CE loss recovered
(zero-ablation baseline, Kissane et al. 2024) on held-out tokens."""

from __future__ import annotations

import torch

from saekit.activations import harvest, resolve_hook
from saekit.splice import ce_losses


@torch.no_grad()
def reconstruction_stats(sae, acts: torch.Tensor, batch_size: int = 4096) -> dict:
    """L0 and explained variance (1 − FVU) of ``sae`` on ``acts [n, d_in]``."""
    err = l0 = 0.0
    for i in range(0, len(acts), batch_size):
        x = acts[i: i + batch_size]
        out = sae(x)
        err += (x - out.x_hat).pow(2).sum().item()
        l0 += (out.codes.values > 0).sum().item()
    var = (acts - acts.mean(0)).pow(2).sum().item()
    return {"l0": l0 / len(acts), "explained_variance": 1 - err / var}


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
    acts = torch.cat([harvest(model, tokens[i: i + 32], hook) for i in range(0, len(tokens), 32)])
    stats = reconstruction_stats(sae, acts.to(sae.W_dec.device))
    ce = ce_losses(model, sae, tokens)
    from saekit.kernels import resolve_impl

    summary = {**stats, "dead_frac": dead_frac, "impl": resolve_impl(sae.cfg.impl, sae.W_dec.device), "ce_loss_clean": ce.clean, "ce_loss_sae": ce.sae,
               "ce_loss_zero_ablation": ce.zero, "ce_loss_recovered": ce.recovered,
               "eval_tokens": len(acts), "steps": trainer.step, "hook": sae.cfg.hook_name,
               "d_sae": sae.cfg.d_sae, "k": sae.cfg.k}
    return summary
