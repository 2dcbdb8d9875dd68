"""The three axes of Makelov, Lange & Nanda (2024) — approximation, control and
interpretability — plus occlusion and over-splitting, as methods.md §7 defines them.

Everything here works on tensors at one node. Running the model is left to a ``run``
callback: ``run(values [n, d_node]) -> Readout`` patches the node and reads END, so the
maths can be tested without a model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from saekit.evals.nodes import Readout

BUDGETS = (1, 2, 4, 8)
F1_COVERED = 0.7  # a value is "covered" by a latent with F1 ≥ this (saekit's threshold, §7)

Run = Callable[[Tensor], Readout]


# ---- an SAE read at a node -----------------------------------------------------------------

class NodeSAE:
    """An SAE on a layer's flattened ``hook_z``, seen at a node: codes come from the whole
    layer activation, reconstructions and decoder directions are sliced to the node."""

    def __init__(self, sae, sl: slice):
        self.sae, self.sl = sae, sl

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Dense latent activations ``[n, d_sae]`` of layer activations ``x [n, d_in]``."""
        return self.sae.encode(x.to(self.sae.W_dec.device)).float().cpu()

    @property
    def directions(self) -> Tensor:  # [d_sae, d_node]
        return self.sae.W_dec.detach().float().cpu()[:, self.sl]

    @property
    def bias(self) -> Tensor:  # [d_node]
        return self.sae.b_dec.detach().float().cpu()[self.sl]

    def reconstruct(self, f: Tensor) -> Tensor:
        return f @ self.directions + self.bias


# ---- approximation ---------------------------------------------------------------------------

def approximation(run: Run, a: Tensor, a_hat: Tensor, explained: Tensor, base: tuple[float, float]) -> dict:
    """Sufficiency: patch ``a_hat``; ``(LD − LD_mean) / (LD_clean − LD_mean)``, 1 = all of the
    logit difference kept. Necessity: patch ``a − explained`` (the activation without what the
    dictionary explains) and report how far LD falls toward mean ablation (1 = all the way).
    ``base`` = (mean LD clean, mean LD with the node mean-ablated), shared by every
    dictionary at the node."""
    clean, mean = base
    patched = run(a_hat).ld.mean().item()
    removed = run(a - explained).ld.mean().item()
    span = clean - mean
    return {"ld_clean": clean, "ld_mean_ablation": mean, "ld_patched": patched, "ld_removed": removed,
            "sufficiency": (patched - mean) / span, "necessity": (clean - removed) / span}


# ---- interpretability --------------------------------------------------------------------------

def f1_table(active: Tensor, labels: Tensor, n_values: int) -> tuple[Tensor, Tensor, Tensor]:
    """Precision, recall and F1 of each latent (``active [n, d_sae]`` bool) as a detector of
    each value (``labels [n]``): ``[d_sae, n_values]`` each. Values with no prompt get 0."""
    A = active.float()
    V = torch.nn.functional.one_hot(labels, n_values).float()  # [n, V]
    tp = A.T @ V  # [d_sae, V]
    precision = tp / A.sum(0).clamp_min(1)[:, None]
    recall = tp / V.sum(0).clamp_min(1)[None]
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return precision, recall, f1


def interpretability(active: Tensor, labels: dict[str, Tensor], values: dict[str, list[str]]) -> dict:
    """Per attribute: best F1 per value (over latents), its mean, and coverage (the share of
    occurring values with a latent at F1 ≥ 0.7)."""
    out = {}
    for attr, lab in labels.items():
        _, _, f1 = f1_table(active, lab, len(values[attr]))
        present = torch.bincount(lab, minlength=len(values[attr])) > 0
        best, arg = f1.max(0)
        out[attr] = {"mean_best_f1": best[present].mean().item(),
                     "coverage": (best[present] >= F1_COVERED).float().mean().item(),
                     "best_f1": {values[attr][v]: round(best[v].item(), 4) for v in present.nonzero()[:, 0].tolist()},
                     "best_latent": {values[attr][v]: arg[v].item() for v in present.nonzero()[:, 0].tolist()}}
    return out


def oversplitting(active: Tensor, labels: Tensor, n_values: int) -> int:
    """Values (one-vs-rest, so binary) covered by ≥ 2 latents each with precision ≥ 0.9 and
    recall < 0.6 whose union reaches recall ≥ 0.9."""
    precision, recall, _ = f1_table(active, labels, n_values)
    count = 0
    for v in range(n_values):
        split = ((precision[:, v] >= 0.9) & (recall[:, v] < 0.6) & (recall[:, v] > 0)).nonzero()[:, 0]
        on_v = labels == v
        if len(split) >= 2 and on_v.any():
            union = active[on_v][:, split].any(1).float().mean().item()
            count += union >= 0.9
    return int(count)


def occlusion(sae_interp: dict, edit_changes: dict[str, float], mean_norms: dict[str, float],
              f1_threshold: float = 0.5) -> dict:
    """Per attribute: occluded when the supervised edit changes the output on ≥ 50% of prompts
    (present and causally relevant), no latent reaches F1 ≥ 0.5 on any of its values, and a
    latent does for another attribute with a larger mean ``‖u_{attr,v}‖``."""
    seen = {a: max(r["best_f1"].values(), default=0.0) >= f1_threshold for a, r in sae_interp.items()}
    out = {}
    for attr in sae_interp:
        shadowing = [b for b in sae_interp if b != attr and seen[b] and mean_norms[b] > mean_norms[attr]]
        out[attr] = {"occluded": bool(edit_changes[attr] >= 0.5 and not seen[attr] and shadowing),
                     "edit_changes_output": edit_changes[attr], "latent_found": seen[attr],
                     "mean_norm": mean_norms[attr], "by": shadowing}
    return out


# ---- control ------------------------------------------------------------------------------------

def weight_removed(removed: Tensor, recon: Tensor, bias: Tensor) -> Tensor:
    """``removed · (x̂ − b) / ‖x̂ − b‖²`` per prompt: the share of the reconstruction taken out."""
    r = recon - bias
    return (removed * r).sum(1) / r.pow(2).sum(1).clamp_min(1e-12)


def aware_edit(f: Tensor, f_cf: Tensor, D: Tensor, f1_old: Tensor, f1_new: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Interpretation-aware edit with ``budget`` latents: remove the active latents with the
    best F1 for the old value, add the latents active on the counterfactual with the best F1
    for the new value, at their counterfactual activations. ``f1_old``/``f1_new``: ``[n, d_sae]``
    (each prompt's column of the F1 table). Returns (delta ``[n, d]``, removed part ``[n, d]``)."""
    def top(score, on):
        s = torch.where(on & (score > 0), score, torch.full_like(score, -1.0))
        val, idx = s.topk(min(budget, s.shape[1]), dim=1)
        return torch.zeros_like(score).scatter_(1, idx, (val > 0).float())

    rm = top(f1_old, f > 0) * f
    add = top(f1_new, f_cf > 0) * f_cf
    removed = rm @ D
    return add @ D - removed, removed


def agnostic_edits(f: Tensor, f_cf: Tensor, D: Tensor, target: Tensor, budgets=BUDGETS) -> dict[int, tuple[Tensor, Tensor]]:
    """Interpretation-agnostic edits: greedily pick latent moves ``δ_j = (f_j(a') − f_j(a))·d_j``
    that bring the edit closest (L2) to ``target = a_cf − a``; the picks at budget n are the
    first n of the greedy sequence. Uses the decoder Gram matrix, so no ``[n, d_sae, d]`` tensor."""
    step = f_cf - f  # [n, d_sae]
    G = D @ D.T  # [d_sae, d_sae]
    c = target @ D.T  # r·d_j for the residual r, [n, d_sae]
    gain_sq = step.pow(2) * G.diagonal()
    chosen = torch.zeros_like(step, dtype=torch.bool)
    rows = torch.arange(len(f))
    out, moved = {}, torch.zeros_like(step)
    for n in range(1, max(budgets) + 1):
        gain = torch.where(chosen | (step == 0), torch.tensor(-torch.inf), 2 * step * c - gain_sq)
        j = gain.argmax(1)
        ok = gain[rows, j] > 0  # stop where no move helps
        chosen[rows[ok], j[ok]] = True
        moved[rows[ok], j[ok]] = step[rows[ok], j[ok]]
        c[ok] -= step[rows[ok], j[ok], None] * G[j[ok]]
        if n in budgets:
            removed = (-moved).clamp_min(0).clamp_max(f) @ D  # the part of f taken away
            out[n] = (moved @ D, removed)
    return out
