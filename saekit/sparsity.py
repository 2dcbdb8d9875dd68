"""Sparsifiers: the one part in which SAE variants differ.

A sparsifier turns an input batch into a sparse code. It is a small ``nn.Module`` (so it can
hold buffers such as inference thresholds, saved with the SAE) chosen by name from
``SAEConfig.sparsity``. Its ``encode`` may also return the AuxK candidates: the top
``k_aux`` pre-activations among dead latents, for the auxiliary loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from saekit.sae import Codes, SAEConfig


class Encoded(NamedTuple):
    codes: Codes
    aux: Codes | None  # top-k_aux among dead latents, when asked for


class TopK(nn.Module):
    """Each token keeps its ``k`` largest ReLU pre-activations (Gao et al. 2024).

    Uses ``saekit.kernels.encode_topk``: one dense matrix product and a top-k forward, and a
    backward that touches only the selected latents (the fused Triton kernel on CUDA)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.k = cfg.k
        self.impl = cfg.impl

    def encode(self, sae, x: Tensor, grad: Tensor | None = None,
               dead_mask: Tensor | None = None, k_aux: int = 0) -> Encoded:
        from saekit import kernels

        if dead_mask is not None and k_aux > 0 and bool(dead_mask.any()):
            top, aux = kernels.encode_topk_aux(x, sae.W_enc, sae.b_enc, sae.b_dec, self.k,
                                               dead_mask, k_aux, impl=self.impl)
            return Encoded(Codes(*top), Codes(*aux))
        top = kernels.encode_topk(x, sae.W_enc, sae.b_enc, sae.b_dec, self.k, impl=self.impl)
        return Encoded(Codes(*top), None)


SPARSIFIERS: dict[str, type[nn.Module]] = {"topk": TopK}


def make_sparsifier(cfg: SAEConfig) -> nn.Module:
    return SPARSIFIERS[cfg.sparsity](cfg)
