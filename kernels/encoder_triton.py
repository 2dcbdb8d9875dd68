"""Fused encoder + top-k Triton kernel; the reference is `reference.encode_topk`.

One pass computes pre = (x - b_dec) @ W_enc + b_enc tile by tile ([BLOCK_B, BLOCK_N], fp32
accumulation in tl.dot) and folds each tile into a running per-row top-K_PAD, so the
[B, d_sae] pre-activation matrix never exists. Grid: (row blocks, d_sae chunks); each
program walks the tiles of its chunk and writes its chunk's K_PAD best candidates as int64
keys to a [B, n_chunks, K_PAD] buffer, sized to stay under 1/8 of the matrix it replaces; a
torch.topk over those (unique) keys gives the final top-k.

Ranking uses the keys of select.py, `(order_preserving_int32(value) << 32) | (2**32-1-index)`:
value descending, then the lower index wins, exactly like the torch path. Before ranking,
each fp32 accumulator is rounded to the input dtype, because the torch reference ranks the
pre-activations as addmm returns them (bf16 for bf16 inputs).

Running top-K merge (`_merge_topk`): with the running keys R sorted descending and the
tile's best K sorted ascending C, max(R, C) element-wise holds the K largest of R u C and is
bitonic (the half-cleaner step of a bitonic merge), so one bitonic merge re-sorts it.

AuxK's selection among dead latents is not made here: its width k_aux (d_in/2 by default)
would have to fit in registers like k's, which limits both to TRITON_MAX_K. encoder.py ranks
a product over the dead columns only (`PreActivations.columns` in encoder.py), which has no such limit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import TRITON_MAX_K, interpreting
from .select import unpack_keys

_MIN_KEY: tl.constexpr = tl.constexpr(-(2**63))


@triton.jit
def _pack(vals, cols):
    """Same keys as select.pack_keys, for fp32 `vals` and int `cols`."""
    bits = vals.to(tl.int32, bitcast=True)
    bits = tl.where(vals == 0.0, 0, bits)  # -0.0 -> +0.0
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | (4294967295 - cols.to(tl.int64))


@triton.jit
def _round_to_input(v, IS_BF16: tl.constexpr):
    """fp32 v rounded to the input dtype (round to nearest even), still held as fp32.

    Written as integer arithmetic rather than v.to(tl.bfloat16): identical to the GPU's
    cvt.rn.bf16.f32 for non-NaN values, and Triton's interpreter truncates in that cast.
    """
    if IS_BF16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        v = bits.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _cas(x, M: tl.constexpr, S: tl.constexpr, FLIP: tl.constexpr):
    """One compare-and-swap layer on x [BB, W]: pairs M apart within blocks of 2M.

    Block p // S of the last axis is put in descending order when its parity equals FLIP,
    ascending otherwise (S = the size of the sequences the current bitonic stage builds).
    Written with tl.min/tl.max over a size-2 axis rather than tl.sort's xor_sum trick: the
    same work on GPU, and Triton's interpreter runs min/max in numpy but a custom reduce
    element by element, far slower (benchmarks/RESULTS.md, "Figures moved from docstrings").
    """
    BB: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    x4 = tl.reshape(x, [BB, W // (2 * M), 2, M])
    lo = tl.min(x4, axis=2, keep_dims=True)
    hi = tl.max(x4, axis=2, keep_dims=True)
    block = tl.arange(0, W // (2 * M)) // (S // (2 * M))
    desc = ((block % 2) == FLIP)[None, :, None, None]
    right = (tl.arange(0, 2) == 1)[None, None, :, None]
    return tl.reshape(tl.where(right != desc, hi, lo), [BB, W])


@triton.jit
def _sort_runs(x, LOG_S: tl.constexpr, FLIP: tl.constexpr):
    """Bitonic sort of each run of 2**LOG_S keys along the last axis; run i descending iff i % 2 == FLIP."""
    for s in tl.static_range(1, LOG_S + 1):
        for t in tl.static_range(s):
            x = _cas(x, 1 << (s - 1 - t), 1 << s, FLIP if s == LOG_S else 0)
    return x


@triton.jit
def _merge_runs(x, LOG_S: tl.constexpr, FLIP: tl.constexpr):
    """Sort each bitonic run of 2**LOG_S keys; run i descending iff i % 2 == FLIP."""
    for t in tl.static_range(LOG_S):
        x = _cas(x, 1 << (LOG_S - 1 - t), 1 << LOG_S, FLIP)
    return x


@triton.jit
def _topk_ascending(keys, LOG_K: tl.constexpr, LOG_N: tl.constexpr):
    """The 2**LOG_K largest of keys [BB, 2**LOG_N] per row, in ascending order (bitonic top-k:
    sort runs of K with alternating directions, then halve: the element-wise max of a
    descending and an ascending run is a bitonic run holding their K largest)."""
    BB: tl.constexpr = keys.shape[0]
    K: tl.constexpr = 1 << LOG_K
    x = _sort_runs(keys, LOG_K, 1 if LOG_K == LOG_N else 0)
    for r in tl.static_range(1, LOG_N - LOG_K + 1):
        # width 2**(LOG_N - r + 1) -> 2**(LOG_N - r); the last round leaves one ascending run
        x = tl.reshape(tl.max(tl.reshape(x, [BB, 1 << (LOG_N - LOG_K - r), 2, K]), axis=2),
                       [BB, K << (LOG_N - LOG_K - r)])
        x = _merge_runs(x, LOG_K, 1 if r == LOG_N - LOG_K else 0)
    return x


@triton.jit
def _merge_topk(top, keys, LOG_K: tl.constexpr, LOG_N: tl.constexpr):
    """top [BB, K] sorted descending, keys [BB, N] -> the K largest of both, sorted descending."""
    K: tl.constexpr = 1 << LOG_K
    if LOG_K <= LOG_N:
        cand = _topk_ascending(keys, LOG_K, LOG_N)
    else:
        # Fewer tile keys than K: sort them ascending and right-align them in a K-wide row
        # padded with _MIN_KEY, which is still ascending.
        BB: tl.constexpr = keys.shape[0]
        N: tl.constexpr = 1 << LOG_N
        srt = tl.expand_dims(_sort_runs(keys, LOG_N, 1), 1)                     # [BB, 1, N]
        wide = tl.reshape(tl.broadcast_to(srt, [BB, K // N, N]), [BB, K])
        cand = tl.where((tl.arange(0, K) >= K - N)[None, :], wide, _MIN_KEY)
    # max(descending, ascending) holds the K largest of both as a bitonic run.
    return _merge_runs(tl.maximum(top, cand), LOG_K, 0)


@triton.jit
def _encoder_topk_kernel(
    x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, keys_ptr,
    B, D_IN, D_SAE, TILES_PER_CHUNK,
    s_xb, s_xd, s_wd, s_wn,
    LOG_K: tl.constexpr,
    BLOCK_B: tl.constexpr, LOG_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, IS_BF16: tl.constexpr,
):
    K_PAD: tl.constexpr = 1 << LOG_K
    BLOCK_N: tl.constexpr = 1 << LOG_N
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    top = tl.full([BLOCK_B, K_PAD], _MIN_KEY, tl.int64)
    for t in range(TILES_PER_CHUNK):
        cols = ((chunk * TILES_PER_CHUNK + t) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < D_SAE
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            kmask = ks < D_IN
            x = tl.load(x_ptr + rows[:, None] * s_xb + ks[None, :] * s_xd,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)            # [BB, BK]
            b_dec = tl.load(b_dec_ptr + ks, mask=kmask, other=0.0)
            # x - b_dec rounded to the input dtype, as torch computes it before the matmul
            xc = _round_to_input(x.to(tl.float32) - b_dec.to(tl.float32)[None, :], IS_BF16).to(x.dtype)
            w = tl.load(w_ptr + ks[:, None] * s_wd + cols[None, :] * s_wn,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)            # [BK, BN]
            if UPCAST_DOT:
                # Triton's interpreter multiplies bf16's raw uint16 storage in tl.dot; bf16
                # products are exact in fp32, so this computes what the GPU's MMA computes.
                xc = xc.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(xc, w, acc, input_precision=DOT_PRECISION)
        acc += tl.load(b_enc_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        pre = _round_to_input(acc, IS_BF16)                                           # [BB, BN]
        keys = tl.where(cmask[None, :], _pack(pre, cols), _MIN_KEY)
        top = _merge_topk(top, keys, LOG_K, LOG_N)
    out_rows = rows[:, None] * n_chunks + chunk
    tl.store(keys_ptr + out_rows * K_PAD + tl.arange(0, K_PAD)[None, :], top, mask=rmask[:, None])


def _plan(B: int, d_sae: int, elt_bytes: int, k_pads: int) -> dict:
    """Block sizes and the number of d_sae chunks for one launch; k_pads: the running top-k
    width (K_PAD)."""
    if interpreting():
        BB, BN, BK = 32, 64, 32  # numpy runs a program per call: few, large programs are fast
    else:
        # Row block sized so the [BB, 128] int64 keys, the accumulator and the running top-k
        # fit in registers at 8 warps (ptxas on sm_90: no spills for bf16 BB=64 k<=32, fp32
        # BB=32; a running top-512 spills whatever the block).
        BB = 64 if (elt_bytes == 2 and k_pads <= 64) else 32 if k_pads <= 256 else 16
        BN, BK = 128, 64 if elt_bytes == 2 else 32
    tiles = triton.cdiv(d_sae, BN)
    # Candidate buffer: B * n_chunks * k_pads int64 keys must stay under 1/8 of the
    # B * d_sae pre-activation matrix it replaces (at least one chunk, whatever d_sae).
    n_chunks = max(1, min(tiles, (d_sae * elt_bytes) // (8 * 8 * k_pads)))
    per_chunk = triton.cdiv(tiles, n_chunks)
    return dict(BLOCK_B=BB, BLOCK_N=BN, BLOCK_K=BK, tiles_per_chunk=per_chunk,
                n_chunks=triton.cdiv(tiles, per_chunk))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _final_topk(keys: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Merge per-chunk candidate keys [B, C] into the top-k: (ReLU values in dtype, int64 indices)."""
    top = keys[:, :k] if keys.shape[1] == _next_pow2(k) else keys.topk(k, dim=1).values
    vals, idx = unpack_keys(top)
    return vals.relu().to(dtype), idx


def encoder_topk_triton(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Fused (x - b_dec) @ W_enc + b_enc -> per-row top-k, without the [B, d_sae] matrix.

    Same as the (values, indices) of `reference.encode_topk(x, W_enc, b_enc, b_dec, k)`, i.e.
    `topk_lower_index((x - b_dec) @ W_enc + b_enc, k)` with ReLU on the values.
    x [B, d_in]; W_enc [d_in, d_sae] (any strides); b_enc [d_sae]; b_dec [d_in]; one float
    dtype (fp32 or bf16); 1 <= k <= TRITON_MAX_K. Returns (values [B, k] in x's dtype, sorted
    descending, ties to the lower index; indices [B, k] int64).
    """
    B, d_in = x.shape
    d_sae = W_enc.shape[1]
    assert W_enc.shape == (d_in, d_sae), f"W_enc {tuple(W_enc.shape)} must be [d_in={d_in}, d_sae]"
    assert b_enc.shape == (d_sae,) and b_dec.shape == (d_in,), "b_enc [d_sae], b_dec [d_in]"
    assert b_enc.is_contiguous() and b_dec.is_contiguous(), "biases must be contiguous"
    assert x.dtype in (torch.float32, torch.bfloat16), f"fp32 or bf16 only, got {x.dtype}"
    assert W_enc.dtype == b_enc.dtype == b_dec.dtype == x.dtype, "x, W_enc, b_enc, b_dec: one dtype"
    assert 1 <= k <= min(d_sae, TRITON_MAX_K), f"k={k} out of range"
    K_PAD = _next_pow2(k)
    p = _plan(B, d_sae, x.element_size(), K_PAD)
    keys = torch.empty(B, p["n_chunks"], K_PAD, dtype=torch.int64, device=x.device)
    # Match torch's fp32 matmul: TF32 only when torch itself allows it for matmuls.
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    grid = (triton.cdiv(B, p["BLOCK_B"]), p["n_chunks"])
    _encoder_topk_kernel[grid](
        x, W_enc, b_enc, b_dec, keys,
        B, d_in, d_sae, p["tiles_per_chunk"], *x.stride(), *W_enc.stride(),
        LOG_K=K_PAD.bit_length() - 1,
        BLOCK_B=p["BLOCK_B"], LOG_N=p["BLOCK_N"].bit_length() - 1, BLOCK_K=p["BLOCK_K"],
        DOT_PRECISION="tf32" if tf32 else "ieee", UPCAST_DOT=interpreting() and x.dtype != torch.float32,
        IS_BF16=x.dtype == torch.bfloat16,
        num_warps=8,
    )
    return _final_topk(keys.view(B, -1), k, x.dtype)
