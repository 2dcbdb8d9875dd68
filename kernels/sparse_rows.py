"""The three sparse row operations the SAE's forward and backward passes are made of.

With `idx` [B, K] (the latents each row selected) and weights `w` [B, K]:

    gather_rows(idx, w, M)      out[b]      = sum_j w[b, j] * M[idx[b, j]]          [B, D]
    row_dot(idx, dense, M)      out[b, j]   = dense[b] . M[idx[b, j]]               [B, K]
    scatter_rows(idx, w, dense) out[idx[b,j]] += w[b, j] * dense[b]                 [N, D]

`M` is [N, D] with any strides (W_dec, or W_enc.t() for the encoder's grad x). Decoding is
`gather_rows(indices, values, W_dec) + b_dec`; its backward is `row_dot` (grad values) and
`scatter_rows` (grad W_dec); the encoder's backward is `scatter_rows` (grad W_enc, built as
W_enc^T rows) and `gather_rows` (grad x). Each costs O(B*K*D), never O(B*N*D).

This module is the PyTorch reference; sparse_rows_triton.py holds the Triton kernels with the
same contracts. All results are fp32 (fp32 accumulation for any input dtype); callers cast.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _check(idx: Tensor, w: Tensor | None, M_or_dense: Tensor, B_dim: int | None = None) -> None:
    assert idx.dim() == 2 and idx.dtype == torch.int64, f"idx must be [B, K] int64, got {tuple(idx.shape)} {idx.dtype}"
    if w is not None:
        assert w.shape == idx.shape, f"weights {tuple(w.shape)} must match idx {tuple(idx.shape)}"
    assert M_or_dense.dim() == 2, "matrices are 2-D"
    if B_dim is not None:
        assert M_or_dense.shape[0] == idx.shape[0], "dense rows must match idx rows"


# ---- PyTorch reference implementations -------------------------------------------------
# Chosen by benchmarks/cpu_kernels.py at B=4096, K=32, D=768, N=12288 on one core (median ms,
# a shared 2-core VM): gather_rows: embedding_bag 26 vs (M[idx] * w).sum 735 (it builds a
# 400 MB [B, K, D] tensor); row_dot: sampled_addmm 44 vs embedding_bag's backward 69 vs
# einsum over M[idx] 495; scatter_rows: sort + embedding_bag 36 vs sparse COO mm 76 vs
# index_add_ of a materialized [B*K, D] product 352.


def gather_rows_torch(idx: Tensor, w: Tensor, M: Tensor) -> Tensor:
    """out[b] = sum_j w[b, j] * M[idx[b, j]]: one fused embedding_bag, [B, D] fp32."""
    _check(idx, w, M)
    if idx.shape[1] == 0:  # embedding_bag rejects empty bags given as a 2-D input
        return torch.zeros(idx.shape[0], M.shape[1], device=idx.device)
    return F.embedding_bag(idx, _f32(M), per_sample_weights=_f32(w), mode="sum")


def row_dot_torch(idx: Tensor, dense: Tensor, M: Tensor) -> Tensor:
    """out[b, j] = dense[b] . M[idx[b, j]]: a sampled dense-dense matmul (SDDMM), [B, K] fp32."""
    _check(idx, None, dense, B_dim=0)
    B, K = idx.shape
    if K == 0:
        return torch.zeros(B, 0, device=idx.device)
    crow = torch.arange(0, B * K + 1, K, device=idx.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": not the caller's concern
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, idx.reshape(-1), torch.zeros(B * K, device=idx.device), (B, M.shape[0]),
            check_invariants=False,
        )
    return torch.sparse.sampled_addmm(pattern, _f32(dense), _f32(M).t()).values().view(B, K)


_tls = threading.local()


def _by_target_row(idx: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """(order, offsets): idx.flatten()[order] is ascending; row n's selections are
    order[offsets[n]:offsets[n+1]].

    A training step sorts the same selections twice (grad W_dec, then grad W_enc), so the last
    result is kept per thread. The cache holds `idx` itself, which keeps its storage alive:
    an equal data_ptr, shape, strides and version counter then mean the same, unmodified
    indices. (The sort is ~5 ms on 2 idle cores but ~110 ms when another process competes
    for them: a 1-D parallel sort waits on both threads at every phase.)
    """
    hit = getattr(_tls, "pattern", None)
    if hit is not None:
        c_idx, c_version, c_rows, result = hit
        if (c_idx.data_ptr() == idx.data_ptr() and c_idx.shape == idx.shape and c_idx.stride() == idx.stride()
                and c_idx.device == idx.device and c_version == idx._version and c_rows == n_rows):
            return result
    flat = idx.reshape(-1)
    _, order = flat.to(torch.int32).sort(stable=True)  # int32 sorts ~2x faster than int64 on CPU
    offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(torch.bincount(flat, minlength=n_rows), 0, out=offsets[1:])
    _tls.pattern = (idx, idx._version, n_rows, (order, offsets))
    return order, offsets


def scatter_rows_torch(idx: Tensor, w: Tensor, dense: Tensor, n_rows: int) -> Tensor:
    """out[n] = sum over (b, j) with idx[b, j] == n of w[b, j] * dense[b]: [n_rows, D] fp32.

    Sort the selections by target row, then one embedding_bag whose bags are the target
    rows: no [B*K, D] intermediate and no atomics.
    """
    _check(idx, w, dense, B_dim=0)
    order, offsets = _by_target_row(idx, n_rows)
    return F.embedding_bag(
        order // idx.shape[1], _f32(dense), offsets,
        per_sample_weights=_f32(w).reshape(-1)[order], mode="sum", include_last_offset=True,
    )


# ---- dispatch --------------------------------------------------------------------------


def gather_rows(idx: Tensor, w: Tensor, M: Tensor, impl: str) -> Tensor:
    if impl == "triton":
        from .sparse_rows_triton import gather_rows_triton

        return gather_rows_triton(idx, w, M)
    return gather_rows_torch(idx, w, M)


def row_dot(idx: Tensor, dense: Tensor, M: Tensor, impl: str) -> Tensor:
    if impl == "triton":
        from .sparse_rows_triton import row_dot_triton

        return row_dot_triton(idx, dense, M)
    return row_dot_torch(idx, dense, M)


def scatter_rows(idx: Tensor, w: Tensor, dense: Tensor, n_rows: int, impl: str) -> Tensor:
    if impl == "triton":
        from .sparse_rows_triton import scatter_rows_triton

        return scatter_rows_triton(idx, w, dense, n_rows)
    return scatter_rows_torch(idx, w, dense, n_rows)
