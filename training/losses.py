"""Loss terms. Each returns a ``dict[str, Tensor]``; the trainer sums the values.

Reconstruction is the normalized MSE (FVU) ``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over the batch,
as in Gao et al. 2024 and methods.md §1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saekit.sae import Codes


def total_variance(x: Tensor) -> Tensor:
    """``Σ‖x − mean(x)‖²`` over the batch: the FVU denominator."""
    return (x - x.mean(0)).pow(2).sum()


def fvu_loss(x: Tensor, x_hat: Tensor, denom: Tensor) -> dict[str, Tensor]:
    return {"fvu": (x - x_hat).pow(2).sum() / denom}


def auxk_loss(sae, x: Tensor, x_hat: Tensor, aux: Codes | None, n_dead: int, k_aux: int,
              coef: float, denom: Tensor) -> dict[str, Tensor]:
    """AuxK (Gao et al. 2024 §A.2): reconstruct the residual ``e = x − x̂`` from the top
    ``k_aux`` pre-activations of dead latents, decoded without ``b_dec``:
    ``L_aux = ‖e − ê‖² / Σ‖x − mean(x)‖²``, scaled by ``min(n_dead / k_aux, 1)`` so that a
    handful of dead latents does not get the full weight. Zero when nothing is dead."""
    if aux is None or n_dead == 0:
        return {"aux": x.new_zeros(())}
    from saekit.kernels import decode_sparse

    e = (x - x_hat).detach()
    e_hat = decode_sparse(aux.values, aux.indices, sae.W_dec, torch.zeros_like(sae.b_dec), impl=sae.cfg.impl)
    scale = min(n_dead / k_aux, 1.0)
    return {"aux": coef * scale * (e - e_hat).pow(2).sum() / denom}
