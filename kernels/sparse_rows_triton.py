"""Triton kernels for the sparse row operations; references in sparse_rows.py.

Imported only when impl="triton" is resolved (this module imports triton at the top).
Every kernel accumulates in fp32 and writes fp32; index arithmetic is done in int64 so
d_sae * d_in beyond 2**31 cannot overflow.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import interpreting


def _blocks() -> tuple[int, int]:
    # (BLOCK_B, BLOCK_D). On GPU 16 rows x 128 columns keeps loads coalesced without
    # spilling at 4 warps (ptxas, sm_90); the interpreter runs each program in numpy, where
    # fewer, larger programs are faster.
    return (16, 64) if interpreting() else (16, 128)


def _check_common(idx: Tensor, *tensors: Tensor) -> None:
    assert idx.dim() == 2 and idx.dtype == torch.int64, f"idx must be [B, K] int64, got {tuple(idx.shape)} {idx.dtype}"
    for t in tensors:
        assert t.device == idx.device, "all tensors must be on one device"
        assert t.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {t.dtype}"


@triton.jit
def _gather_rows_kernel(
    idx_ptr, w_ptr, m_ptr, out_ptr, B, K, D,
    s_ib, s_ik, s_wb, s_wk, s_mn, s_md,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    rmask = rows < B
    mask = rmask[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for j in range(K):
        n = tl.load(idx_ptr + rows * s_ib + j * s_ik, mask=rmask, other=0)
        w = tl.load(w_ptr + rows * s_wb + j * s_wk, mask=rmask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + n[:, None] * s_mn + cols[None, :] * s_md, mask=mask, other=0.0)
        acc += w[:, None] * m.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc, mask=mask)


def gather_rows_triton(idx: Tensor, w: Tensor, M: Tensor) -> Tensor:
    """out[b] = sum_j w[b, j] * M[idx[b, j]], [B, D] fp32.

    Same as `F.embedding_bag(idx, M, per_sample_weights=w, mode="sum")` (gather_rows_torch).
    idx [B, K] int64 with values in [0, N); w [B, K]; M [N, D], any strides.
    """
    _check_common(idx, w, M)
    assert w.shape == idx.shape and M.dim() == 2, f"w {tuple(w.shape)} vs idx {tuple(idx.shape)}, M {tuple(M.shape)}"
    B, K = idx.shape
    D = M.shape[1]
    out = torch.zeros(B, D, dtype=torch.float32, device=idx.device)
    if B == 0 or K == 0:
        return out
    BB, BD = _blocks()
    grid = (triton.cdiv(B, BB), triton.cdiv(D, BD))
    _gather_rows_kernel[grid](
        idx, w, M, out, B, K, D, *idx.stride(), *w.stride(), *M.stride(), BLOCK_B=BB, BLOCK_D=BD, num_warps=4,
    )
    return out


@triton.jit
def _row_dot_kernel(
    idx_ptr, dense_ptr, m_ptr, out_ptr, P, K, D,
    s_db, s_dd, s_mn, s_md,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per BLOCK_P (row, slot) pairs p = b * K + s of the contiguous idx: 2-D
    # tiles only (a [rows, slots, D] tile spills registers), dense rows re-read from cache.
    ps = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    pmask = ps < P
    n = tl.load(idx_ptr + ps, mask=pmask, other=0)
    b = ps // K
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = pmask[:, None] & (ds < D)[None, :]
        dense = tl.load(dense_ptr + b[:, None] * s_db + ds[None, :] * s_dd, mask=mask, other=0.0)
        m = tl.load(m_ptr + n[:, None] * s_mn + ds[None, :] * s_md, mask=mask, other=0.0)
        acc += tl.sum(m.to(tl.float32) * dense.to(tl.float32), axis=1)
    tl.store(out_ptr + ps, acc, mask=pmask)


def row_dot_triton(idx: Tensor, dense: Tensor, M: Tensor) -> Tensor:
    """out[b, j] = dense[b] . M[idx[b, j]], [B, K] fp32.

    Same as `torch.sparse.sampled_addmm(csr_pattern(idx), dense, M.T).values()` (row_dot_torch).
    idx [B, K] int64 (made contiguous); dense [B, D]; M [N, D]; any strides.
    """
    _check_common(idx, dense, M)
    assert dense.shape[0] == idx.shape[0] and dense.shape[1] == M.shape[1], (
        f"dense {tuple(dense.shape)}, M {tuple(M.shape)}, idx {tuple(idx.shape)}"
    )
    B, K = idx.shape
    D = M.shape[1]
    out = torch.empty(B, K, dtype=torch.float32, device=idx.device)
    if B == 0 or K == 0:
        return out
    BP, BD = (64, 64)
    _row_dot_kernel[(triton.cdiv(B * K, BP),)](
        idx.contiguous(), dense, M, out, B * K, K, D, *dense.stride(), *M.stride(),
        BLOCK_P=BP, BLOCK_D=BD, num_warps=4,
    )
    return out


@triton.jit
def _scatter_rows_kernel(
    idx_ptr, w_ptr, dense_ptr, out_ptr, B, K, D,
    s_ib, s_ik, s_wb, s_wk, s_db, s_dd,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    rmask = rows < B
    mask = rmask[:, None] & (cols < D)[None, :]
    dense = tl.load(dense_ptr + rows[:, None] * s_db + cols[None, :] * s_dd, mask=mask, other=0.0).to(tl.float32)
    for j in range(K):
        n = tl.load(idx_ptr + rows * s_ib + j * s_ik, mask=rmask, other=0)
        w = tl.load(w_ptr + rows * s_wb + j * s_wk, mask=rmask, other=0.0).to(tl.float32)
        tl.atomic_add(out_ptr + n[:, None] * D + cols[None, :], w[:, None] * dense, mask=mask)


def scatter_rows_triton(idx: Tensor, w: Tensor, dense: Tensor, n_rows: int) -> Tensor:
    """out[n] = sum over (b, j) with idx[b, j] == n of w[b, j] * dense[b], [n_rows, D] fp32.

    Same as `torch.zeros(n_rows, D).index_add_(0, idx.flatten(), (w[..., None] * dense[:, None]).flatten(0, 1))`
    (scatter_rows_torch). fp32 atomics: the order of additions, hence the last bits, can vary
    between runs.
    """
    _check_common(idx, w, dense)
    assert w.shape == idx.shape and dense.shape[0] == idx.shape[0], (
        f"w {tuple(w.shape)}, dense {tuple(dense.shape)}, idx {tuple(idx.shape)}"
    )
    B, K = idx.shape
    D = dense.shape[1]
    out = torch.zeros(n_rows, D, dtype=torch.float32, device=idx.device)
    if B == 0 or K == 0:
        return out
    BB, BD = _blocks()
    grid = (triton.cdiv(B, BB), triton.cdiv(D, BD))
    _scatter_rows_kernel[grid](
        idx, w, dense, out, B, K, D, *idx.stride(), *w.stride(), *dense.stride(), BLOCK_B=BB, BLOCK_D=BD, num_warps=4,
    )
    return out
