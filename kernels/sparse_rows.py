"""The three sparse row operations the SAE's forward and backward passes are made of.

With `idx` [B, K] (the latents each row selected) and weights `w` [B, K]:

    gather_rows(idx, w, M)      out[b]      = sum_j w[b, j] * M[idx[b, j]]          [B, D]
    row_dot(idx, dense, M)      out[b, j]   = dense[b] . M[idx[b, j]]               [B, K]
    scatter_rows(idx, w, dense) out[idx[b,j]] += w[b, j] * dense[b]                 [N, D]

`M` is [N, D] with any strides (W_dec, or W_enc.t() for the encoder's grad x). Decoding is
`gather_rows(indices, values, W_dec) + b_dec`; its backward is `row_dot` (grad values) and
`scatter_rows` (grad W_dec); the encoder's backward is `scatter_rows` (grad W_enc, built as
W_enc^T rows) and `gather_rows` (grad x). Each costs O(B*K*D), never O(B*N*D).

Ragged selections (Mutual and Feature Choice give each row its own number of latents) pass
`lengths` [B]: row b's entries are its first lengths[b] columns and the rest is padding,
which the three operations skip (row_dot writes 0 there). The PyTorch path then works on
the real entries only, O(nnz·D) rather than O(B·K_max·D); the Triton path runs the padded
form, whose padding weighs 0, and zeroes row_dot's padding.

This module is the PyTorch reference; sparse_rows_triton.py holds the Triton kernels with the
same contracts. All results are fp32 (fp32 accumulation for any input dtype); callers cast.
"""

from __future__ import annotations

import threading
import warnings
from typing import NamedTuple

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
# Chosen by benchmarks/cpu_kernels.py at B=4096, K=32, D=768, N=12288, each the fastest of
# the alternatives it times: gather_rows: embedding_bag, not (M[idx] * w).sum (it builds a
# 400 MB [B, K, D] tensor); row_dot: sampled_addmm, not embedding_bag's backward or einsum
# over M[idx]; scatter_rows: sort + embedding_bag, not a sparse COO mm or index_add_ of a
# materialized [B*K, D] product. The times: benchmarks/RESULTS.md, "The selections beside
# their alternatives" (2 threads) and "Figures moved from docstrings" (one core).


def check_lengths(lengths: Tensor, lead: tuple[int, ...], K: int) -> None:
    """Ragged-code lengths must be int64 of shape ``lead`` with every entry in [0, K]."""
    if lengths.shape != lead or lengths.dtype != torch.int64:
        raise ValueError(f"lengths must be int64 of shape {tuple(lead)}, got {lengths.dtype} {tuple(lengths.shape)}")
    if lengths.numel():
        lo, hi = torch.aminmax(lengths)
        if int(lo) < 0 or int(hi) > K:
            raise ValueError(f"lengths must be in [0, {K}] (the codes' width), got [{int(lo)}, {int(hi)}]")


class Entries(NamedTuple):
    """The real entries of a [B, K] selection, row by row (CSR): entry e sits in row
    rows[e] at column cols[e]; row b's entries are crow[b]:crow[b+1]; `mask` [B, K] (None
    when every column is real) picks them out of the padded form."""

    cols: Tensor   # [nnz] int64
    rows: Tensor   # [nnz] int64
    crow: Tensor   # [B + 1] int64
    mask: Tensor | None

    def weights(self, w: Tensor) -> Tensor:
        return _f32(w).reshape(-1) if self.mask is None else _f32(w)[self.mask]


_tls = threading.local()


def _cached(slot: str, key: tuple[Tensor | None, ...], extra, compute):
    """``compute()``, kept per thread in ``slot`` for the last ``key``.

    A training step reuses one selection several times (decoding, its backward, the
    encoder's backward), so the last result is kept. The cache holds the key tensors
    themselves, which keeps their storage alive: an equal data_ptr, shape, strides, dtype
    and version counter then mean the same tensors, unless they were written behind
    autograd's back (through ``.data`` or numpy), which the version counter does not see.
    Inference tensors have no version counter and are never cached."""
    if any(t is not None and t.is_inference() for t in key):
        return compute()

    def sig(t):
        return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t._version)

    hit = getattr(_tls, slot, None)
    if hit is not None and hit[2] == extra and len(hit[0]) == len(key) and all(
            (a is None) == (b is None) and (a is None or sig(a) == s) for a, b, s in zip(key, hit[0], hit[1])):
        return hit[3]
    result = compute()
    setattr(_tls, slot, (key, tuple(sig(t) for t in key), extra, result))
    return result


def entries(idx: Tensor, lengths: Tensor | None) -> Entries:
    """The real entries of ``idx`` [B, K]: all of them, or row b's first lengths[b]."""
    def compute():
        B, K = idx.shape
        if lengths is None:
            crow = torch.arange(B + 1, device=idx.device) * K
            rows = torch.arange(B, device=idx.device).repeat_interleave(K)
            return Entries(idx.reshape(-1), rows, crow, None)
        mask = torch.arange(K, device=idx.device) < lengths[:, None]
        crow = torch.zeros(B + 1, dtype=torch.int64, device=idx.device)
        torch.cumsum(lengths, 0, out=crow[1:])
        rows = torch.arange(B, device=idx.device).repeat_interleave(lengths, output_size=int(crow[-1]))
        return Entries(idx[mask], rows, crow, mask)

    return _cached("entries", (idx, lengths), None, compute)


def row_pointers(index: Tensor, n: int) -> Tensor:
    """[n + 1] int64: where each value 0..n-1 of the ascending ``index`` starts (CSR row
    pointers of a pattern whose rows are ``index``)."""
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=n), 0, out=ptr[1:])
    return ptr


def sampled_addmm_csr(crow: Tensor, cols: Tensor, bias: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``bias[e] + left[r] . right[:, cols[e]]`` for each entry e of CSR row r (row pointers
    ``crow``): a sampled dense-dense matmul, values [nnz] in left's dtype."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": not the caller's concern
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, bias, (left.shape[0], right.shape[1]), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, left, right).values()


def gather_rows_torch(idx: Tensor, w: Tensor, M: Tensor, lengths: Tensor | None = None) -> Tensor:
    """out[b] = sum_j w[b, j] * M[idx[b, j]]: one fused embedding_bag, [B, D] fp32."""
    _check(idx, w, M)
    if idx.shape[1] == 0:  # embedding_bag rejects empty bags given as a 2-D input
        return torch.zeros(idx.shape[0], M.shape[1], device=idx.device)
    if lengths is None:
        return F.embedding_bag(idx, _f32(M), per_sample_weights=_f32(w), mode="sum")
    e = entries(idx, lengths)
    return F.embedding_bag(e.cols, _f32(M), e.crow, per_sample_weights=e.weights(w), mode="sum",
                           include_last_offset=True)


def row_dot_torch(idx: Tensor, dense: Tensor, M: Tensor, lengths: Tensor | None = None) -> Tensor:
    """out[b, j] = dense[b] . M[idx[b, j]]: a sampled dense-dense matmul (SDDMM), [B, K] fp32
    (0 at padding)."""
    _check(idx, None, dense, B_dim=0)
    B, K = idx.shape
    if K == 0:
        return torch.zeros(B, 0, device=idx.device)
    e = entries(idx, lengths)
    vals = sampled_addmm_csr(e.crow, e.cols, torch.zeros(len(e.cols), device=idx.device), _f32(dense), _f32(M).t())
    if e.mask is None:
        return vals.view(B, K)
    return torch.zeros(B, K, device=idx.device).masked_scatter_(e.mask, vals)


def _by_target_row(cols: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """(order, offsets): cols[order] is ascending; target row n's entries are
    order[offsets[n]:offsets[n+1]]. Kept per thread (grad W_dec, then grad W_enc, sort the
    same entries): the sort is cheap on idle cores but many times slower when another
    process competes for them (a 1-D parallel sort waits on both threads at every phase;
    benchmarks/RESULTS.md, "Figures moved from docstrings")."""
    def compute():
        _, order = cols.to(torch.int32).sort(stable=True)  # int32 sorts faster than int64 on CPU (RESULTS.md)
        return order, row_pointers(cols, n_rows)

    return _cached("by_target_row", (cols,), n_rows, compute)


def scatter_rows_torch(idx: Tensor, w: Tensor, dense: Tensor, n_rows: int, lengths: Tensor | None = None) -> Tensor:
    """out[n] = sum over (b, j) with idx[b, j] == n of w[b, j] * dense[b]: [n_rows, D] fp32.

    Sort the selections by target row, then one embedding_bag whose bags are the target
    rows: no [B*K, D] intermediate and no atomics.
    """
    _check(idx, w, dense, B_dim=0)
    e = entries(idx, lengths)
    order, offsets = _by_target_row(e.cols, n_rows)
    return F.embedding_bag(
        e.rows[order], _f32(dense), offsets,
        per_sample_weights=e.weights(w)[order], mode="sum", include_last_offset=True,
    )


# ---- dispatch --------------------------------------------------------------------------


# The Triton kernels run the padded form: padding weighs 0 in gather_rows and scatter_rows
# (callers guarantee it), and row_dot's padding is zeroed here.

def gather_rows(idx: Tensor, w: Tensor, M: Tensor, impl: str, lengths: Tensor | None = None) -> Tensor:
    if impl == "triton":
        from .sparse_rows_triton import gather_rows_triton

        return gather_rows_triton(idx, w, M)
    return gather_rows_torch(idx, w, M, lengths)


def row_dot(idx: Tensor, dense: Tensor, M: Tensor, impl: str, lengths: Tensor | None = None) -> Tensor:
    if impl == "triton":
        from .sparse_rows_triton import row_dot_triton

        out = row_dot_triton(idx, dense, M)
        return out if lengths is None else out * (torch.arange(idx.shape[1], device=idx.device) < lengths[:, None])
    return row_dot_torch(idx, dense, M, lengths)


def scatter_rows(idx: Tensor, w: Tensor, dense: Tensor, n_rows: int, impl: str,
                 lengths: Tensor | None = None) -> Tensor:
    if impl == "triton":
        from .sparse_rows_triton import scatter_rows_triton

        return scatter_rows_triton(idx, w, dense, n_rows)
    return scatter_rows_torch(idx, w, dense, n_rows, lengths)
