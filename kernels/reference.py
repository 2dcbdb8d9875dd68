"""The specification of saekit's kernels in plain PyTorch: what each public operation
computes, written as directly as the maths, with autograd doing the backward passes.

The fast paths behind ``saekit.kernels`` (the reused workspace and the hierarchical top-k
of encoder.py and select.py, the bf16 screen of screen.py and screen_batch.py, the Triton
kernels) must give these results; tests/test_reference.py checks each against this file.
Layout (SAELens): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
"""

from __future__ import annotations

import torch
from torch import Tensor


def pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """``(x − b_dec) @ W_enc + b_enc`` [B, d_sae]."""
    return (x - b_dec) @ W_enc + b_enc


def pre_columns(xc: Tensor, W_enc: Tensor, b_enc: Tensor, cols: Tensor) -> Tensor:
    """The pre-activations of the latents ``cols`` only, given ``xc = x − b_dec``:
    ``xc @ W_enc[:, cols] + b_enc[cols]`` [B, len(cols)] (read from W_enc^T's rows, which
    saekit.SAE stores contiguously)."""
    return torch.addmm(b_enc[cols], xc, W_enc.t()[cols].t())


def topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row the ``k`` largest scores, sorted descending, ties to the lower index (a
    stable sort keeps equal values in index order): (values [R, k], indices [R, k])."""
    values, indices = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The TopK encoder (Gao et al. 2024): rank the pre-activations, keep ``k`` a row, ReLU
    the kept values: (values [B, k], indices [B, k])."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    indices = topk(pre.detach(), k)[1]
    return pre.gather(1, indices).relu(), indices


def encode_selected(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, indices: Tensor) -> Tensor:
    """The encoder's activations ``ReLU(pre)`` at latents selected elsewhere: [B, K]."""
    return pre_activations(x, W_enc, b_enc, b_dec).gather(1, indices).relu()


def global_topk(scores: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``n`` largest entries of the whole matrix (Mutual Choice, BatchTopK): (rows,
    cols, values) in no particular order; which of equal values at the cut are kept is
    unspecified."""
    top = scores.reshape(-1).topk(n)
    return top.indices // scores.shape[1], top.indices % scores.shape[1], top.values


def column_topk(scores: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each column j its ``m[j]`` largest entries (Feature Choice): (rows, cols,
    values) of all of them, and each column's ``m[j]``-th value [C]; which of equal values
    at a column's cut are kept is unspecified."""
    values, rows = scores.sort(dim=0, descending=True)
    keep = torch.arange(scores.shape[0], device=scores.device)[:, None] < m  # [R, C]
    cols = torch.arange(scores.shape[1], device=scores.device).expand_as(rows)
    smallest = values.gather(0, (m - 1)[None])[0]
    return rows[keep], cols[keep], values[keep], smallest


def decode_sparse(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """``x̂ = Σ_s values[b, s]·W_dec[indices[b, s]] + b_dec`` [B, d_in], through the dense code."""
    dense = values.new_zeros(values.shape[0], W_dec.shape[0]).scatter_add(1, indices, values)
    return dense @ W_dec + (0 if b_dec is None else b_dec)
