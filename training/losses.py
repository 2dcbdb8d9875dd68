"""Loss terms. Each returns a ``dict[str, Tensor]``; the trainer sums the values.

Reconstruction is the normalized MSE (FVU) ``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over the batch,
as in Gao et al. 2024 and methods.md §1.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from saekit import kernels
from saekit.elementwise import step
from saekit.sae import SAE
from saekit.types import Codes


def sum_sq(t: Tensor) -> Tensor:
    """``Σ t²`` in one pass over a contiguous ``t`` (a BLAS dot product of ``t`` with
    itself; fp32 relative error ~1e-5 at 3M elements, against ~1e-9 for ``.pow(2).sum()``:
    ample for a loss)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


class _SquaredError(torch.autograd.Function):
    """``Σ (x̂ − x)²``, differentiable wrt ``x̂`` only, in two passes forward and one backward
    (``2(x̂ − x)·g``). The autograd chain of ``(x − x̂).pow(2).sum()`` makes about eight
    passes over ``[B, d_in]``; the times on CPU: benchmarks/RESULTS.md, "Figures moved from
    docstrings"."""

    @staticmethod
    def forward(ctx, x_hat: Tensor, x: Tensor) -> Tensor:
        e = x_hat - x
        ctx.save_for_backward(e)
        return sum_sq(e)

    @staticmethod
    @once_differentiable  # e carries no graph: a second derivative would be silently wrong
    def backward(ctx, g: Tensor):
        (e,) = ctx.saved_tensors
        return e * (2 * g), None


def squared_error(x_hat: Tensor, x: Tensor) -> Tensor:
    """``Σ‖x̂ − x‖²`` over everything, in at least float32 (a bf16 sum of squares would keep 8
    bits; float64 stays float64); the gradient flows to ``x_hat`` (``x`` is the target)."""
    dtype = torch.promote_types(x_hat.dtype, torch.float32)
    return _SquaredError.apply(x_hat.to(dtype), x.detach().to(dtype))


def total_variance(x: Tensor) -> Tensor:
    """``Σ‖x − mean(x)‖²`` over the batch: the FVU denominator."""
    return sum_sq(x - x.mean(0))


def fvu_loss(x: Tensor, x_hat: Tensor, denom: Tensor) -> dict[str, Tensor]:
    return {"fvu": squared_error(x_hat, x) / denom}


class Encoded(NamedTuple):
    codes: Codes
    aux: Codes | None  # the auxiliary losses' selection, when asked for


def encode_with_aux(sae: SAE, x: Tensor, grad: Tensor | None = None, weights: Tensor | None = None,
                    k_aux: int = 0, update: bool = False) -> Encoded:
    """``sae.encode(x, grad, update=update)`` and, with ``weights``, the auxiliary selection
    (``aux_select``) from the same pre-activations, both given the sparse backward in one
    ``sae.attach``: the trainer's encoding step."""
    pre = sae.pre_activations(x)
    codes = sae.select(pre, grad, update=update)
    aux = None if weights is None else aux_select(pre, weights, k_aux)
    return Encoded(*sae.attach(pre, codes, aux))


def aux_select(pre: kernels.PreActivations, weights: Tensor, k_aux: int) -> Codes | None:
    """The auxiliary losses' selection: per token the top ``k_aux`` of ``weights ⊙ ReLU(pre)``
    among the latents with a positive weight, ties to the lower index, valued at the plain
    ``ReLU(pre)`` (ranking ``weights ⊙ pre`` keeps the same positive entries), without
    autograd (``SAE.attach`` gives the values their backward). AuxK passes the dead mask as
    ``weights``, aux_zipf graded weights. ``pre``: the batch's pre-activations the code was
    selected from (their dense matrix, where it was made, or a product over the eligible
    columns alone); call it before encoding another batch. None when no latent is eligible
    or ``k_aux`` is 0."""
    eligible = (weights > 0).nonzero().flatten()  # ascending, so the tie rule carries over
    if len(eligible) == 0 or k_aux <= 0:
        return None
    return Codes(*pre.topk_among(eligible, min(k_aux, len(eligible)), weights[eligible]))


def auxk_loss(sae: SAE, x: Tensor, x_hat: Tensor, aux: Codes | None, n_dead: int, k_aux: int,
              coef: float, denom: Tensor, norm: str = "residual",
              variance: Callable[[Tensor], Tensor] = total_variance) -> dict[str, Tensor]:
    """AuxK (Gao et al. 2024 §A.2): reconstruct the residual ``e = x − x̂`` (a constant
    target) from the top ``k_aux`` pre-activations of dead latents, decoded without
    ``b_dec`` to ``ê``. Zero when nothing is dead. Two normalisations:

    - ``norm="residual"`` (default; Gao et al.'s code, openai/sparse_autoencoder
      ``normalized_mse(ê, e)``): ``L_aux = ‖e − ê‖² / Σ‖e − mean(e)‖²``, unscaled.
    - ``norm="input"`` (saekit before; methods.md §1's wording):
      ``L_aux = min(n_dead / k_aux, 1) · ‖e − ê‖² / Σ‖x − mean(x)‖²``. The residual's
      variance is a fraction (the FVU) of x's, and the scale shrinks it again with few dead
      latents, so at the same ``coef`` this term is several times weaker.

    ``denom`` is ``Σ‖x − mean(x)‖²`` of the (global) batch; ``variance`` computes the
    residual's (the trainer passes its all-reducing one). aux_zipf uses the same term with
    its own selection (``n_dead`` = latents eligible)."""
    if aux is None or n_dead == 0:
        return {"aux": x.new_zeros(())}
    e = (x - x_hat).detach()
    e_hat = kernels.decode_sparse(aux.values, aux.indices, sae.W_dec, torch.zeros_like(sae.b_dec), impl=sae.cfg.impl)
    if norm == "residual":
        return {"aux": coef * squared_error(e_hat, e) / variance(e).clamp_min(1e-30)}
    scale = min(n_dead / k_aux, 1.0)
    return {"aux": coef * scale * squared_error(e_hat, e) / denom}


def zipf_weights(freq: Tensor, dead: Tensor, tail_frac: float = 0.2, gamma: float = 0.5) -> Tensor:
    """aux_zipf's per-latent weights — saekit's formulation (methods.md §4).

    Sort latents by running firing frequency ``p``; fit ``log p = c − s·log r`` by least
    squares over the ranks outside the bottom ``tail_frac`` (and with ``p > 0``); a latent is
    underused when ``p_j < γ·p̂_j`` and weighs ``1 − p_j / (γ·p̂_j)``; dead latents weigh 1;
    all others 0. With only dead latents below the fit, the weights are the dead mask and
    aux_zipf is exactly AuxK."""
    n = len(freq)
    order = freq.argsort(descending=True)
    ranks = torch.empty(n, device=freq.device)
    ranks[order] = torch.arange(1, n + 1, dtype=torch.float, device=freq.device)
    fit = (ranks <= n * (1 - tail_frac)) & (freq > 0)
    w = dead.float()
    if int(fit.sum()) >= 2:
        lr, lp = ranks[fit].log(), freq[fit].log()
        slope = ((lr - lr.mean()) * (lp - lp.mean())).sum() / (lr - lr.mean()).pow(2).sum().clamp_min(1e-12)
        expected = (lp.mean() + slope * (ranks.log() - lr.mean())).exp()  # p̂ at each rank
        under = freq < gamma * expected
        w = torch.where(under, (1 - freq / (gamma * expected)).clamp(0, 1), w)
        w = torch.maximum(w, dead.float())
    return w


# ---- the elementwise architectures' penalties (saekit.elementwise) ---------------------------
# Default weights λ: those of the shipped SAEs (pretrained/saes/*-L3-corpus), each chosen once,
# by extrapolating 1M-token runs, for a mean L0 near the TopK default's 32 over the default job
# (4M tokens of the embedded model's blocks.3.attn.hook_z, d_sae 2048). They reached L0 30.6
# (standard), 25.1 (jumprelu) and 16.0 (gated) there: docs/evaluation.md, "The shipped SAEs".
# Another hook, width or budget gives another L0: sweep --l1-coef / --l0-coef for a target.
DEFAULT_L1 = {"standard": 0.8, "gated": 0.6}
DEFAULT_L0 = 0.01


def _decoder_norms(sae: SAE) -> Tensor:
    return sae.W_dec.norm(dim=1)  # [d_sae]


def l1_penalty(sae: SAE, x: Tensor, h: Tensor, f: Tensor, coef: float, denom: Tensor, n_tokens: int) -> dict:
    """The standard SAE's sparsity term (Anthropic's "April update", Conerly et al. 2024; SAELens'
    ``standard``): ``λ · Σ_b Σ_j f_bj ‖W_dec[j]‖``, weighted by the decoder norms because the
    rows train freely. saekit's normalisation: divided by ``sqrt(n_tokens · Σ‖x − mean(x)‖²)``
    (the batch's token count times its RMS distance from the mean), so that λ, like the FVU, does
    not depend on the activations' scale; the recipe's own form is λ·E[Σ f‖d‖] on inputs
    normalised to a fixed mean norm."""
    return {"l1": coef * (f.sum(0) * _decoder_norms(sae)).sum() / (n_tokens * denom).sqrt()}


def l0_penalty(sae: SAE, x: Tensor, h: Tensor, f: Tensor, coef: float, denom: Tensor, n_tokens: int) -> dict:
    """JumpReLU's sparsity term (Rajamanoharan et al. 2024b, eq. 10): ``λ · mean_b Σ_j H(z_bj − θ_j)``,
    the mean L0, with the straight-through gradient of θ (``saekit.elementwise.step``)."""
    z = h + sae.b_enc
    return {"l0": coef * step(z, sae.threshold, sae.sparsifier.bandwidth).sum() / n_tokens}


def gated_penalty(sae: SAE, x: Tensor, h: Tensor, f: Tensor, coef: float, denom: Tensor, n_tokens: int) -> dict:
    """The Gated SAE's terms beside the reconstruction (Rajamanoharan et al. 2024a, eq. 8): the
    L1 penalty on the gate's ``ReLU(π_gate)`` (weighted by decoder norms as SAELens does; they are
    1 here, as in the paper, so the weight changes nothing) and the auxiliary reconstruction
    ``‖x − (ReLU(π_gate) W_dec + b_dec)‖²`` through the frozen decoder (no gradient to
    ``W_dec``, ``b_dec``), normalised like the FVU (divided by ``Σ‖x − mean(x)‖²``); the L1 is
    normalised as ``l1_penalty``'s."""
    gate = (h + sae.b_enc).relu()
    x_frozen = torch.addmm(sae.b_dec.detach(), gate, sae.W_dec.detach())
    l1 = l1_penalty(sae, x, h, gate, coef, denom, n_tokens)["l1"]
    return {"l1": l1, "gate_fvu": squared_error(x_frozen, x) / denom}


# The penalty terms of each elementwise architecture; its weight λ is OptimOptions.l1_coef or l0_coef.
PENALTIES = {"standard": l1_penalty, "jumprelu": l0_penalty, "gated": gated_penalty}


def prefix_fvu_loss(sae: SAE, x: Tensor, codes: Codes, sizes: list[int], denom: Tensor) -> tuple[Tensor, dict]:
    """Matryoshka's reconstruction (Bussmann et al. 2025, "Learning Multi-Level Features with
    Matryoshka Sparse Autoencoders", §3; Nabeshima 2024): for each prefix size ``m`` in
    ``sizes`` (increasing, the last ``d_sae``), the FVU of the reconstruction from latents
    ``0..m−1`` alone, ``x̂_m = Σ_{j<m} f_j W_dec[j] + b_dec``; the loss is their sum. Returns the
    full reconstruction ``x̂`` and the terms ``fvu`` (the full one, as other architectures log
    it) and ``prefix_fvu`` (the sum over the shorter prefixes). The latents of each group
    ``[m_{g−1}, m_g)`` are decoded once and the reconstructions summed cumulatively."""
    zero = torch.zeros_like(sae.b_dec)
    x_hat, lo, prefixes = sae.b_dec, 0, []
    for hi in sizes:
        in_group = (codes.indices >= lo) & (codes.indices < hi)
        x_hat = x_hat + kernels.decode_sparse(codes.values * in_group, codes.indices, sae.W_dec, zero,
                                              impl=sae.cfg.impl, lengths=codes.lengths)
        prefixes.append(squared_error(x_hat, x) / denom)
        lo = hi
    return x_hat, {"fvu": prefixes[-1], "prefix_fvu": sum(prefixes[:-1], x.new_zeros(()))}
