"""The three axes of Makelov, Lange & Nanda (2024) — approximation, control and
interpretability — plus occlusion and over-splitting, as methods.md §7 defines them.

Everything here works on tensors at one node. Running the model is left to a ``run``
callback: ``run(values [n, d_node]) -> Readout`` patches the node and reads END, so the
maths can be tested without a model.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from saekit.evals.nodes import Readout

# Edit budgets in latents changed. Makelov et al.'s released code files an interpretation-aware
# edit that swaps n latents (n removed, n added) under 2n, beside n-step agnostic edits, and
# compares them at 2, 4, 8, 16; saekit counts the same way.
BUDGETS = (2, 4, 8, 16)
F1_COVERED = 0.7  # a value is "covered" by a latent with F1 ≥ this (saekit's threshold, §7)

Run = Callable[[Tensor], Readout]


# ---- an SAE read at a node -----------------------------------------------------------------

class NodeSAE:
    """An SAE on a layer's flattened ``hook_z``, seen at a node: codes come from the whole
    layer activation, reconstructions and decoder directions are sliced to the node."""

    def __init__(self, sae, sl: slice):
        self.sae, self.sl = sae, sl

    @torch.no_grad()
    def codes(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        """Dense latent activations ``[n, d_sae]`` of layer activations ``x [n, d_in]``;
        ``grad`` (∂L/∂x, same shape) reaches the sparsifier, which only gtopk uses."""
        dev = self.sae.W_dec.device
        return self.sae.encode_dense(x.to(dev), None if grad is None else grad.to(dev)).float().cpu()

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


def interpretability(fit_active: Tensor, fit_labels: dict[str, Tensor], eval_active: Tensor,
                     eval_labels: dict[str, Tensor], values: dict[str, list[str]]) -> dict:
    """Per attribute: for each value, the latent with the best F1 on the *fit* prompts
    (``best_latent``, its ``fit_f1``) and that latent's precision, recall and F1 on the
    *evaluation* prompts (``best_precision``, ``best_recall``, ``best_f1``); the mean of
    ``best_f1`` and coverage (the share of values with ``best_f1`` ≥ 0.7). Values occurring
    in both sets are reported.

    Makelov, Lange & Nanda (2024)'s released code computes the F1 table once, on the prompts
    it reports, and takes the best; the maximum over thousands of latents is then biased
    upward by the choice itself. saekit chooses on the fit prompts and measures on the
    evaluation prompts, a held-out score."""
    out = {}
    for attr, lab in eval_labels.items():
        n_v = len(values[attr])
        fit_f1 = f1_table(fit_active, fit_labels[attr], n_v)[2]  # [d_sae, V]
        precision, recall, f1 = f1_table(eval_active, lab, n_v)
        chosen = fit_f1.argmax(0)  # [V]
        both = (torch.bincount(fit_labels[attr], minlength=n_v) > 0) & (torch.bincount(lab, minlength=n_v) > 0)
        vs = both.nonzero()[:, 0]
        score = f1[chosen, torch.arange(n_v)]  # [V]
        at = lambda t: {values[attr][v]: round(t[chosen[v], v].item(), 4) for v in vs.tolist()}  # noqa: E731
        out[attr] = {"mean_best_f1": score[vs].mean().item() if len(vs) else 0.0,
                     "coverage": (score[vs] >= F1_COVERED).float().mean().item() if len(vs) else 0.0,
                     "best_f1": at(f1), "best_precision": at(precision), "best_recall": at(recall),
                     "fit_f1": at(fit_f1),
                     "best_latent": {values[attr][v]: chosen[v].item() for v in vs.tolist()}}
    return out


def _split_latents(active: Tensor, labels: Tensor, n_values: int) -> Tensor:
    """``[d_sae, V]`` bool: latent j is precise (≥ 0.9) and partial (0 < recall < 0.6) for v."""
    precision, recall, _ = f1_table(active, labels, n_values)
    return (precision >= 0.9) & (recall < 0.6) & (recall > 0)


def oversplitting(fit_active: Tensor, fit_labels: Tensor, eval_active: Tensor, eval_labels: Tensor,
                  n_values: int) -> int:
    """Values (one-vs-rest, so binary) split over ≥ 2 latents each with precision ≥ 0.9 and
    recall < 0.6 whose union reaches recall ≥ 0.9. The candidate latents are chosen on the
    fit prompts; the split is measured on the evaluation prompts (each candidate must still
    be precise and partial there, and their union must cover the value there), so chance
    splits of the fit set are not counted."""
    fit_split = _split_latents(fit_active, fit_labels, n_values)
    eval_split = _split_latents(eval_active, eval_labels, n_values)
    count = 0
    for v in range(n_values):
        split = (fit_split[:, v] & eval_split[:, v]).nonzero()[:, 0]
        on_v = eval_labels == v
        if len(split) >= 2 and on_v.any():
            union = eval_active[on_v][:, split].any(1).float().mean().item()
            count += union >= 0.9
    return int(count)


def occlusion(sae_interp: dict, edit_changes: dict[str, float], mean_norms: dict[str, float],
              f1_threshold: float = 0.5) -> dict:
    """Per attribute: occluded when the supervised edit changes the output on ≥ 50% of prompts
    (present and causally relevant), no latent reaches F1 ≥ 0.5 on any of its values, and a
    latent does for another attribute with a larger mean ``‖u_{attr,v}‖``. "Reaches" reads
    ``sae_interp``'s ``best_f1``: latents chosen on the fit prompts, F1 on the evaluation
    prompts (``interpretability``); ``edit_changes`` is measured on the evaluation prompts
    and ``mean_norms`` are the fitted dictionary's."""
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


class Edit(NamedTuple):
    """An SAE edit of the node's activation, per prompt."""

    delta: Tensor  # [n, d_node] added to the activation
    removed: Tensor  # [n, d_node] the part of the reconstruction taken out (for weight_removed)
    changed: Tensor  # [n] int: latents whose value the edit changes


def aware_edit(f: Tensor, f_cf: Tensor, D: Tensor, f1_old: Tensor, f1_new: Tensor, budget: int) -> Edit:
    """Interpretation-aware edit changing ``budget`` latents (even): remove the ``budget/2``
    active latents with the best F1 for the old value and add the ``budget/2`` latents active
    on the counterfactual with the best F1 for the new value, at their counterfactual
    activations (Makelov, Lange & Nanda 2024; their released code counts such an edit of n
    exchanges as 2n latents against n-step agnostic edits, and so does saekit). Only latents
    with F1 > 0 are used, so a prompt with fewer candidates changes fewer latents
    (``changed``). ``f1_old``/``f1_new``: ``[n, d_sae]``, each prompt's column of an F1 table;
    ``eval_sae_at_node`` passes the fit prompts' table (a choice of latents, not a score)."""
    if budget % 2:
        raise ValueError(f"an interpretation-aware edit removes and adds equally; budget {budget} must be even")

    def top(score, on):
        s = torch.where(on & (score > 0), score, torch.full_like(score, -1.0))
        val, idx = s.topk(min(budget // 2, s.shape[1]), dim=1)
        return torch.zeros_like(score).scatter_(1, idx, (val > 0).float())

    rm = top(f1_old, f > 0) * f
    add = top(f1_new, f_cf > 0) * f_cf
    removed = rm @ D
    changed = ((f - rm + add) != f).sum(1)
    return Edit(add @ D - removed, removed, changed)


def agnostic_edits(f: Tensor, f_cf: Tensor, D: Tensor, target: Tensor, budgets=BUDGETS) -> dict[int, Edit]:
    """Interpretation-agnostic edits (Makelov, Lange & Nanda 2024): greedily pick latent moves
    ``δ_j = (f_j(a') − f_j(a))·d_j`` that bring the edit closest (L2) to ``target = a_cf − a``;
    the edit at budget n is the first n moves of the greedy sequence, n latents changed
    (fewer where no further move helps: ``changed``). Uses the decoder Gram matrix, so no
    ``[n, d_sae, d]`` tensor."""
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
            out[n] = Edit(moved @ D, removed, chosen.sum(1))
    return out
