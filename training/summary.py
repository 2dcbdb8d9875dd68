"""The end-of-run summary, on held-out tokens the run never trained on (``saekit.data``):
L0, explained variance, the trainer's dead fraction, and CE loss recovered with the SAE
spliced in against zero ablation (of the spliced positions, and of every position as
Kissane et al. 2024 report it) and mean ablation."""

from __future__ import annotations

from saekit import data
from saekit.activations import harvest_batches, resolve_hook
from saekit.kernels import resolve_impl
from saekit.metrics import reconstruction_stats
from saekit.models import load_model
from saekit.precision import DTYPES, dtype_name
from saekit.splice import ce_losses, with_model_gradients

# What the summary reports of saekit.metrics.reconstruction_stats (eval.json has all).
SUMMARY_STATS = ("l0", "l0_std", "explained_variance", "dense_frac")


def summary_stats(sae, acts, grads=None) -> dict:
    """Mean L0 and its spread over tokens, explained variance (1 − FVU) and the dense
    fraction (latents firing on more than 10% of tokens) on ``acts [n, d_in]``."""
    return {k: v for k, v in reconstruction_stats(sae, acts, grads).items() if k in SUMMARY_STATS}


def eval_tokens(model, cfg):
    """Held-out token sequences of the run's source, never trained on (``saekit.data``:
    held-out streams, validation splits or hash-held-out documents)."""
    d = cfg.data
    n_seq = max(1, cfg.run.eval_tokens // (d.seq_len - 1))
    return data.heldout_sequences(model.tokenizer, d.dataset, n_seq, d.seq_len, cfg.run.seed + 1, d.heldout_frac)


def summarize(sae, trainer, cfg, model=None, dtype="auto") -> dict:
    """The summary of a trained ``sae`` (module docstring); ``model`` (or, trained from a cache,
    the run's model loaded in ``dtype``, the cache's) runs the held-out tokens."""
    sae.eval()
    dead_frac = trainer.dead_mask().float().mean().item()  # the trainer's counters, not the eval tokens
    if model is None:  # trained from a cache: the model is only needed for the summary
        model = load_model(cfg.data.model, cfg.data.device, dtype, **cfg.data.placement)
    tokens = eval_tokens(model, cfg)
    hook = resolve_hook(model, sae.cfg.hook_name)
    acts = harvest_batches(model, tokens, hook).to(sae.W_dec.device)
    stats = summary_stats(sae, acts)
    ce = ce_losses(model, sae, tokens, mean=sae.unflatten_hook(acts.mean(0)))
    impl = resolve_impl(sae.cfg.impl, sae.W_dec.device, DTYPES[cfg.optim.sae_dtype], sae.cfg.selected_k)
    summary = {**stats, "dead_frac": dead_frac, "impl": impl,
               "dtype": dtype_name(model.cfg.dtype), "sae_dtype": cfg.optim.sae_dtype,
               **ce.as_dict(), "eval_tokens": len(acts),
               "eval_split": data.describe_heldout(cfg.data.dataset, cfg.data.heldout_frac),
               "steps": trainer.step, "hook": sae.cfg.hook_name, "d_sae": sae.cfg.d_sae, "k": sae.cfg.selected_k}
    if type(sae.sparsifier).uses_grad:  # the figures above select as TopK: its rule without labels
        summary["with_model_gradients"] = with_model_gradients(model, sae, tokens)
    return summary
