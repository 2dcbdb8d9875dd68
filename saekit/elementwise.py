"""Elementwise activation rules: the architectures whose latents each decide alone whether
to fire, from the encoder product ``h = (x − b_dec) @ W_enc`` and the encoder bias ``b``:

    standard   f = ReLU(h + b_enc)                                 (ReLU SAE, L1 penalty)
    jumprelu   f = (h + b_enc) · 1[h + b_enc > θ]                  (Rajamanoharan et al. 2024b)
    gated      f = 1[h + b_gate > 0] · ReLU(exp(r_mag) ⊙ h + b_mag) (Rajamanoharan et al. 2024a)

A rule is the other half of the SAE's activation, beside the selections of
``saekit.sparsity`` (TopK, BatchTopK, ...): where a selection ranks latents against each
other without autograd, a rule is a differentiable function of ``h``, decoded densely (no
sparse kernels: most of these SAEs' latents fire early in training). Its parameters beyond
``W_enc, b_enc, W_dec, b_dec`` (``params``) live on the SAE under SAELens' names, so state
dicts and files interoperate; gated's encoder bias is SAELens' ``b_gate`` (``bias_name``).

A rule answers the same three questions a sparsifier does (``uses_grad``, ``batch_level``,
``row_topk``: all False) and one more, ``unit_decoder``: whether the trainer keeps decoder
rows at unit norm (the "April update" ReLU recipe lets their norms train, and weighs the L1
penalty by them instead). The loss terms of each architecture are in
``saekit.training.losses`` (``PENALTIES``).
"""

from __future__ import annotations

import torch
from torch import Tensor

THRESHOLD_INIT = 1e-3  # JumpReLU's θ at the start (Rajamanoharan et al. 2024b, App. I; Gemma Scope)


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel ``K(u) = 1[−½ < u < ½]`` of JumpReLU's pseudo-derivatives."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _kernel_sum(g: Tensor, z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """``Σ_b g_bj·(1/ε)·K((z_bj − θ_j)/ε)`` per latent j: the factor both pseudo-derivatives share."""
    return (g * rectangle((z - theta) / eps)).reshape(-1, z.shape[-1]).sum(0) / eps


class _JumpReLU(torch.autograd.Function):
    """``z · 1[z > θ]``; ``∂/∂z = 1[z > θ]``, and the straight-through pseudo-derivative
    ``ð/ðθ = −(θ/ε)·K((z − θ)/ε)`` (Rajamanoharan et al. 2024b, eq. 11)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        return g * (z > theta), -theta * _kernel_sum(g, z, theta, ctx.bandwidth), None


class _Step(torch.autograd.Function):
    """``H(z − θ) = 1[z > θ]``; no gradient to ``z``, and ``ð/ðθ = −(1/ε)·K((z − θ)/ε)``
    (Rajamanoharan et al. 2024b, eq. 12): what trains θ through the L0 penalty."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        return None, -_kernel_sum(g, z, theta, ctx.bandwidth), None


def jumprelu(z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """``z · 1[z > θ]`` with the straight-through gradient of θ (rectangle kernel, width ``bandwidth``)."""
    return _JumpReLU.apply(z, theta, bandwidth)


def step(z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """``1[z > θ]`` with the straight-through gradient of θ: JumpReLU's L0, differentiable in θ."""
    return _Step.apply(z, theta, bandwidth)


class ElementwiseRule:
    """Base of the elementwise rules: ``rule(h, b, p) -> f``, differentiable; ``p`` maps each
    name of ``params`` to the SAE's parameter of that name."""

    uses_grad = batch_level = row_topk = False
    unit_decoder = True
    bias_name = "b_enc"
    params: tuple[str, ...] = ()

    def __init__(self, cfg):
        self.bandwidth = cfg.variant.bandwidth

    def init_params(self, d_sae: int) -> dict[str, Tensor]:
        return {}


class ReLU(ElementwiseRule):
    """The standard SAE, ``f = ReLU((x − b_dec) W_enc + b_enc)``, trained as Anthropic's
    "April update" (Conerly et al. 2024): decoder rows free (``unit_decoder = False``) and the
    L1 penalty weighted by their norms (``saekit.training.losses.l1_penalty``); SAELens'
    ``standard``."""

    unit_decoder = False

    def __call__(self, h: Tensor, b: Tensor, p: dict[str, Tensor]) -> Tensor:
        return (h + b).relu()


class JumpReLU(ElementwiseRule):
    """JumpReLU (Rajamanoharan et al. 2024b, "Jumping Ahead", eq. 4; Gemma Scope):
    ``f = z · 1[z > θ]``, ``z = (x − b_dec) W_enc + b_enc``, a learned threshold ``θ`` per
    latent (``threshold``, SAELens' name). θ trains through straight-through estimators with
    a rectangle kernel of width ε (``bandwidth``, eqs. 11–12); the loss is FVU + λ·L0
    (``saekit.training.losses.l0_penalty``).

    Where saekit differs from the authors' code: θ is trained directly and clamped at 0 after
    each step, where their pseudo-code (App. J) trains log θ; saekit's ε is in the units of
    the pre-activations, which saekit does not normalise (Gemma Scope scales inputs to unit
    mean squared norm first). Pre-activations pass no ReLU: with θ ≥ 0 the kept values are
    positive anyway."""

    params = ("threshold",)

    def init_params(self, d_sae: int) -> dict[str, Tensor]:
        return {"threshold": torch.full((d_sae,), THRESHOLD_INIT)}

    def __call__(self, h: Tensor, b: Tensor, p: dict[str, Tensor]) -> Tensor:
        return jumprelu(h + b, p["threshold"], self.bandwidth)


class Gated(ElementwiseRule):
    """Gated SAE (Rajamanoharan et al. 2024a, "Improving Dictionary Learning with Gated
    Sparse Autoencoders", eqs. 6–7): one ``W_enc`` for two paths,

        π_gate = h + b_gate,   π_mag = exp(r_mag) ⊙ h + b_mag,   f = 1[π_gate > 0] · ReLU(π_mag)

    The gate decides which latents fire, the magnitude path their values; the Heaviside gate
    passes no gradient, so the gate trains through the L1 penalty on ``ReLU(π_gate)`` and the
    auxiliary reconstruction through the frozen decoder (eq. 8;
    ``saekit.training.losses.gated_penalty``). Parameters under SAELens' names: the encoder
    bias is ``b_gate``; ``r_mag`` and ``b_mag`` start at 0 as in SAELens and the paper's code."""

    bias_name = "b_gate"
    params = ("r_mag", "b_mag")

    def init_params(self, d_sae: int) -> dict[str, Tensor]:
        return {"r_mag": torch.zeros(d_sae), "b_mag": torch.zeros(d_sae)}

    def __call__(self, h: Tensor, b: Tensor, p: dict[str, Tensor]) -> Tensor:
        return (h + b > 0) * (p["r_mag"].exp() * h + p["b_mag"]).relu()


# Each rule by the name SAEConfig.sparsity gives it; saekit.sparsity.SPARSIFIERS holds the selections.
RULES: dict[str, type[ElementwiseRule]] = {"standard": ReLU, "jumprelu": JumpReLU, "gated": Gated}
