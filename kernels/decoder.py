"""Sparse decoder: x_hat = sum_s values[b, s] * W_dec[indices[b, s]] + b_dec, and its autograd.

The dense equivalent is `scatter(values, indices) @ W_dec + b_dec`; here the work is
O(B*k*d_in) instead of O(B*d_sae*d_in). Backward, with go = dL/dx_hat [B, d_in]:
    grad values[b, s]           = go[b] . W_dec[indices[b, s]]        (row_dot)
    grad W_dec[j]               = sum of values[b, s] * go[b] over (b, s) with indices[b, s] = j
                                                                      (scatter_rows)
    grad b_dec                  = sum_b go[b]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dispatch import resolve_impl
from .sparse_rows import check_lengths, gather_rows, row_dot, scatter_rows


class _DecodeSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec, impl, lengths):
        out = gather_rows(indices, values, W_dec, impl, lengths)  # [B, d_in] fp32
        if b_dec is not None:
            out += b_dec
        ctx.save_for_backward(values, indices, W_dec, lengths)
        ctx.impl = impl
        ctx.has_bias = b_dec is not None
        return out.to(W_dec.dtype)

    @staticmethod
    def backward(ctx, go):
        values, indices, W_dec, lengths = ctx.saved_tensors
        need_v, _, need_W, need_b = ctx.needs_input_grad[:4]
        go = go.float()
        grad_v = row_dot(indices, go, W_dec, ctx.impl, lengths).to(values.dtype) if need_v else None
        grad_W = (scatter_rows(indices, values, go, W_dec.shape[0], ctx.impl, lengths).to(W_dec.dtype)
                  if need_W else None)
        grad_b = go.sum(0).to(W_dec.dtype) if need_b and ctx.has_bias else None
        return grad_v, None, grad_W, grad_b, None, None


def decode_sparse(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None, *, impl: str = "auto",
    lengths: Tensor | None = None,
) -> Tensor:
    """x_hat [..., d_in] = sum_s values[..., s] * W_dec[indices[..., s]] + b_dec.

    values [..., k] (float), indices [..., k] int64 in [0, d_sae); W_dec [d_sae, d_in];
    b_dec [d_in] or None (AuxK decodes without it). Accumulates in fp32, returns W_dec's
    dtype. Differentiable wrt values, W_dec (scatter-add over the selected rows) and b_dec.
    lengths [...] int64 (ragged codes): only each row's first lengths entries count, the
    rest is padding with value 0 and gets no gradient; the work is then O(nnz·d_in).
    """
    if values.shape != indices.shape or indices.dtype != torch.int64:
        raise ValueError(f"values {tuple(values.shape)} and int64 indices {tuple(indices.shape)} {indices.dtype} "
                         "must match")
    if W_dec.dim() != 2 or (b_dec is not None and b_dec.shape != (W_dec.shape[1],)):
        raise ValueError(f"W_dec must be [d_sae, d_in] and b_dec [d_in], got {tuple(W_dec.shape)}, "
                         f"{None if b_dec is None else tuple(b_dec.shape)}")
    impl = resolve_impl(impl, W_dec.device, values.dtype, values.shape[-1])
    lead = values.shape[:-1]
    shape = (math.prod(lead), values.shape[-1])  # [B, k]; k may be 0 (AuxK, no dead latents)
    if lengths is not None:
        check_lengths(lengths, lead, values.shape[-1])
        lengths = lengths.reshape(-1)
    out = _DecodeSparse.apply(values.reshape(shape), indices.reshape(shape), W_dec, b_dec, impl, lengths)
    return out.unflatten(0, lead)
