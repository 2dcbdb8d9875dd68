"""The core metrics training and the evals share (methods.md §8): FVU and explained
variance, L0, the firing-frequency summary, next-token loss and CE loss recovered.

Each is computed here and only here; ``saekit.splice`` runs the model to get the losses,
``saekit.training.summary`` and ``saekit.evals`` report them. These are metrics, not loss
terms: the trainer's reconstruction loss is ``saekit.training.losses``' fused squared
error, whose float arithmetic differs (a BLAS dot product, see ``losses.sum_sq``).

FVU (fraction of variance unexplained) of rows ``x [n, d]`` and their reconstruction ``x̂``:

    FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖²,   explained variance = 1 − FVU
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

DENSE = 0.1  # a latent firing on more than 10% of tokens is dense (§8)


# ---- reconstruction -----------------------------------------------------------------------
def residual_sq(x: Tensor, x_hat: Tensor) -> Tensor:
    """``Σ‖x − x̂‖²`` over everything, in ``x``'s dtype: the FVU numerator."""
    return (x - x_hat).pow(2).sum()


def centred_sq(x: Tensor) -> Tensor:
    """``Σ‖x − mean(x)‖²`` over rows of ``x [n, d]``, in ``x``'s dtype: the FVU denominator."""
    return (x - x.mean(0)).pow(2).sum()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """FVU of ``x_hat`` for ``x [n, d]``, the quotient taken in ``x``'s dtype."""
    return (residual_sq(x, x_hat) / centred_sq(x)).item()


def fvu_of_sums(sq_error: float, total_var: float) -> float:
    """FVU from its two sums as Python floats (the quotient in double precision)."""
    return sq_error / total_var


def explained_variance(fvu_value: float) -> float:
    """``1 − FVU``."""
    return 1 - fvu_value


def l0_per_token(codes: Tensor) -> Tensor:
    """Active latents per row: of dense codes ``[n, d_sae]`` or of a sparse code's values ``[n, k]``."""
    return (codes != 0).sum(-1)


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


class ReconstructionStream:
    """Streams reconstruction statistics over batches of activations: the squared error
    per batch in the batch's dtype, summed in double; the total variance from double
    moments, ``Σ‖x‖² − ‖Σx‖²/n``."""

    def __init__(self, d_sae: int, d_in: int):
        self.err, self.n = 0.0, 0
        self.sum, self.sumsq = torch.zeros(d_in, dtype=torch.float64), 0.0
        self.counts = torch.zeros(d_sae, dtype=torch.long)
        self.l0s: list[Tensor] = []

    def add(self, x: Tensor, out) -> None:
        """One batch ``x [b, d_in]`` and the SAE's output on it (``x_hat``, sparse ``codes``)."""
        self.err += residual_sq(x, out.x_hat).item()
        self.sum += x.double().sum(0).cpu()
        self.sumsq += x.double().pow(2).sum().item()
        self.n += len(x)
        on = out.codes.values != 0
        self.l0s.append(l0_per_token(out.codes.values).cpu())
        self.counts += torch.bincount(out.codes.indices[on].cpu(), minlength=len(self.counts))

    def result(self) -> dict:
        """L0 (mean, spread, histogram), FVU, explained variance and ``frequency_summary``."""
        total_var = self.sumsq - self.sum.pow(2).sum().item() / self.n  # Σ‖x − mean x‖²
        l0 = torch.cat(self.l0s).float()
        hist = torch.bincount(l0.long())
        f = fvu_of_sums(self.err, total_var)
        return {"l0": l0.mean().item(), "l0_std": l0.std().item(), "fvu": f,
                "explained_variance": explained_variance(f), "tokens": self.n,
                "l0_hist": hist.tolist(), **frequency_summary(self.counts, self.n)}


@torch.no_grad()
def reconstruction_stats(sae, acts: Tensor, grads: Tensor | None = None, batch_size: int = 4096) -> dict:
    """On ``acts [n, d_in]`` (``grads``, the loss gradients, for gtopk): L0 (mean, spread,
    histogram), FVU and explained variance, never-fired and dense fractions, frequency
    histogram."""
    acc = ReconstructionStream(sae.cfg.d_sae, sae.cfg.d_in)
    for i in range(0, len(acts), batch_size):
        x = acts[i: i + batch_size].to(sae.W_dec.device)
        g = None if grads is None else grads[i: i + batch_size].to(sae.W_dec.device)
        acc.add(x, sae(x, g))
    return acc.result()


# ---- next-token loss ----------------------------------------------------------------------
def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``logits [b, T, V]`` on ``tokens [b, T]``."""
    # tokens sit on the embedding's device, logits on the unembedding's (they differ under --device-map)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten().to(logits.device))


def loss_recovered(clean: float, spliced: float, ablated: float) -> float:
    """(L_ablated − L_spliced) / (L_ablated − L_clean): 1 = the splice loses nothing, 0 = as
    bad as the ablation (Kissane et al. 2024). NaN where the ablation leaves the loss as it
    is (a hook the loss does not depend on, e.g. in a randomly initialised model): there is
    nothing to recover, and the ratio is undefined."""
    if ablated == clean:
        return float("nan")
    return (ablated - spliced) / (ablated - clean)


class CELosses(NamedTuple):
    """Next-token losses of one model with an SAE spliced in and its baselines
    (``saekit.splice.ce_losses`` measures them)."""

    clean: float
    sae: float
    zero_keep_bos: float  # positions 1: zeroed, BOS kept (the positions the splice replaces)
    zero_all: float  # every position zeroed, BOS included (Kissane et al. 2024)
    kl: float  # mean KL(clean ‖ spliced) of the next-token distributions, nats per position
    mean: float = float("nan")  # loss with positions 1: mean-ablated, when a mean was given

    @property
    def recovered_zero_keep_bos(self) -> float:
        """Loss recovered against zero ablation of the positions the splice replaces."""
        return loss_recovered(self.clean, self.sae, self.zero_keep_bos)

    @property
    def recovered_zero_all(self) -> float:
        """Loss recovered against zero ablation of every position (Kissane et al.'s figure)."""
        return loss_recovered(self.clean, self.sae, self.zero_all)

    @property
    def recovered_mean(self) -> float:
        """Loss recovered against mean ablation (positions 1:)."""
        return loss_recovered(self.clean, self.sae, self.mean)

    def as_dict(self) -> dict[str, float]:
        """The keys summary.json and eval.json use."""
        d = {"ce_loss_clean": self.clean, "ce_loss_sae": self.sae,
             "ce_loss_zero_ablation_keep_bos": self.zero_keep_bos, "ce_loss_zero_ablation_all": self.zero_all,
             "ce_loss_recovered_zero_keep_bos": self.recovered_zero_keep_bos,
             "ce_loss_recovered_zero_all": self.recovered_zero_all, "kl": self.kl}
        if self.mean == self.mean:  # a mean was given
            d |= {"ce_loss_mean_ablation": self.mean, "ce_loss_recovered_mean": self.recovered_mean}
        return d
