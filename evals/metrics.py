"""Standard SAE metrics (methods.md §8): L0, FVU / explained variance, CE loss recovered
against zero ablation (of the spliced positions, and of every position as Kissane et al.
report it) and mean ablation, KL of the spliced model, the never-fired and dense fractions,
the firing-frequency histogram and the per-token L0 spread. ``saekit eval`` writes them as
``eval.json`` beside the SAE, with an HTML report.

``never_fired_frac`` is measured on the evaluation tokens; it is not the training run's
``dead_frac`` (summary.json, metrics.jsonl: latents the trainer's counters found silent for
``dead_tokens`` tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.splice import loss_recovered

DENSE = 0.1  # a latent firing on more than 10% of tokens is dense (§8)


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """``Σ‖x − x̂‖² / Σ‖x − mean x‖²`` over rows of ``x [n, d]``."""
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def l0_per_token(codes: Tensor) -> Tensor:
    """Active latents per row of dense codes ``[n, d_sae]``."""
    return (codes != 0).sum(1)


def frequency_summary(counts: Tensor, n_tokens: int, bins: int = 30) -> dict:
    """Never-fired fraction (no activation on any of the ``n_tokens``), dense fraction
    (> 10% of tokens) and a histogram of log10 firing frequency over the latents that fired."""
    freq = counts.double() / n_tokens
    alive = freq[freq > 0].log10()
    lo = min(alive.min().item(), -6.0) if len(alive) else -6.0
    hist = torch.histc(alive, bins=bins, min=lo, max=0.0) if len(alive) else torch.zeros(bins)
    edges = torch.linspace(lo, 0.0, bins + 1)
    return {"never_fired_frac": (counts == 0).double().mean().item(),
            "dense_frac": (freq > DENSE).double().mean().item(),
            "log10_freq_hist": {"edges": edges.tolist(), "counts": hist.int().tolist()}}


class _Accumulator:
    """Streams reconstruction statistics over batches of activations."""

    def __init__(self, d_sae: int, d_in: int):
        self.err, self.n = 0.0, 0
        self.sum, self.sumsq = torch.zeros(d_in, dtype=torch.float64), 0.0
        self.counts = torch.zeros(d_sae, dtype=torch.long)
        self.l0s: list[Tensor] = []

    def add(self, x: Tensor, out) -> None:
        self.err += (x - out.x_hat).pow(2).sum().item()
        self.sum += x.double().sum(0).cpu()
        self.sumsq += x.double().pow(2).sum().item()
        self.n += len(x)
        on = out.codes.values != 0
        self.l0s.append(on.sum(1).cpu())
        self.counts += torch.bincount(out.codes.indices[on].cpu(), minlength=len(self.counts))

    def result(self) -> dict:
        total_var = self.sumsq - self.sum.pow(2).sum().item() / self.n  # Σ‖x − mean x‖²
        l0 = torch.cat(self.l0s).float()
        hist = torch.bincount(l0.long())
        return {"l0": l0.mean().item(), "l0_std": l0.std().item(), "fvu": self.err / total_var,
                "explained_variance": 1 - self.err / total_var, "tokens": self.n,
                "l0_hist": hist.tolist(), **frequency_summary(self.counts, self.n)}


@torch.no_grad()
def reconstruction_stats(sae, acts: Tensor, grads: Tensor | None = None, batch_size: int = 4096) -> dict:
    """On ``acts [n, d_in]`` (``grads``, the loss gradients, for gtopk): L0 (mean, spread,
    histogram), FVU and explained variance, never-fired and dense fractions, frequency
    histogram."""
    acc = _Accumulator(sae.cfg.d_sae, sae.cfg.d_in)
    for i in range(0, len(acts), batch_size):
        x = acts[i: i + batch_size].to(sae.W_dec.device)
        g = None if grads is None else grads[i: i + batch_size].to(sae.W_dec.device)
        acc.add(x, sae(x, g))
    return acc.result()


@torch.no_grad()
def evaluate_sae(model, sae, tokens: Tensor, batch_size: int = 32) -> dict:
    """Every §8 metric of ``sae`` on ``tokens [n, T]`` (BOS positions excluded, as in training)."""
    from saekit.activations import harvest_batches, resolve_hook
    from saekit.splice import ce_losses, check_sae_fits

    sae.cfg = check_sae_fits(model, sae)
    hook = resolve_hook(model, sae.cfg.hook_name)
    acts = harvest_batches(model, tokens, hook, batch_size)  # [n·(T−1), d_in]
    stats = reconstruction_stats(sae, acts)
    mean = sae.unflatten_hook(acts.mean(0))
    ce = ce_losses(model, sae, tokens, batch_size, mean=mean)
    out = {**stats, **ce.as_dict(),
           "hook": sae.cfg.hook_name, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "sparsity": sae.cfg.sparsity}
    if sae.cfg.sparsity == "gtopk":  # the main figures are its label-free rule, TopK (methods.md §5)
        out["with_model_gradients"] = with_model_gradients(model, sae, tokens, batch_size)
    return out


@torch.no_grad()
def with_model_gradients(model, sae, tokens: Tensor, batch_size: int = 32) -> dict:
    """A g-SAE scored while it selects with gradients, without an oracle.

    Selecting with ∂L/∂x of the very next-token loss that is then reported would let the
    selection see the labels it is scored on. Here the gradients are of the loss against the
    model's own greedy predictions (``activation_and_grad(targets="model")``), over the first
    ``T − 1`` tokens of each sequence, and CE is scored at the last of those positions only,
    against token ``T``, which no gradient has read (at earlier positions the later *input*
    tokens, which are the earlier positions' labels, flow into the gradient). The same
    positions are scored clean and with the g-SAE selecting as TopK (β = 0), so the three
    losses compare directly. Explained variance and L0 are over every position (they read
    no label)."""
    from saekit.activations import activation_and_grad, resolve_hook
    from saekit.splice import reconstruct_hook

    hook = resolve_hook(model, sae.cfg.hook_name)
    inp, target = tokens[:, :-1], tokens[:, -1]
    xs, gs, sums = [], [], torch.zeros(3)
    for i in range(0, len(tokens), batch_size):
        t, y = inp[i: i + batch_size].to(model.cfg.device), target[i: i + batch_size].to(model.cfg.device)
        act, grad = activation_and_grad(model, t, hook, targets="model")  # [b, T-1, *shape]
        xs.append(sae.flatten_hook(act[:, 1:]).reshape(-1, sae.cfg.d_in).float())
        gs.append(sae.flatten_hook(grad[:, 1:]).reshape(-1, sae.cfg.d_in).float())
        last = [model(t)[:, -1],
                model.run_with_hooks(t, fwd_hooks=[(hook.name, reconstruct_hook(sae))])[:, -1],
                model.run_with_hooks(t, fwd_hooks=[(hook.name, reconstruct_hook(sae, grad))])[:, -1]]
        sums += torch.tensor([F.cross_entropy(lg.float(), y, reduction="sum").item() for lg in last])
    clean, topk, with_g = (sums / len(tokens)).tolist()
    stats = reconstruction_stats(sae, torch.cat(xs), torch.cat(gs))
    return {"gradients": "next-token loss against the model's own greedy predictions (no text labels)",
            "scored": "CE at the last position of each sequence, whose label no gradient read",
            "positions": len(tokens), "ce_loss_clean_last": clean, "ce_loss_sae_topk_last": topk,
            "ce_loss_sae_with_grads_last": with_g, "explained_variance": stats["explained_variance"],
            "l0": stats["l0"]}


__all__ = ["reconstruction_stats", "fvu", "l0_per_token", "frequency_summary", "evaluate_sae", "loss_recovered",
           "with_model_gradients"]
