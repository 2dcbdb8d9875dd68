"""Exact TopK selection screened by a bf16 matmul: the CPU fast path (impl="screen") of the
TopK encoder and of Mutual and Feature Choice's selections.

The dense fp32 product ``(x - b_dec) @ W_enc + b_enc`` dominates a TopK SAE's step on CPU. On
CPUs with AMX a bf16 product runs several times faster (B=4096, d_in=768, d_sae=12288, timed
in the same rounds by benchmarks/train_step.py: benchmarks/RESULTS.md, "With the bf16-screened
encoder"). Its values are too coarse to rank
with, but a rigorous bound on their error says which latents can still be in a row's top k.
Only those (~2k a row) are recomputed in fp32:

1. ``a = bf16(xc) @ bf16(W_enc) + bf16(b_enc)``, accumulated in fp32 and rounded to bf16;
2. a bound ``|r - a| <= E_b + u'|a|`` for every latent of row b, where ``r`` is the fp32
   pre-activation as step 4 computes it (``_row_bounds``);
3. a threshold ``tau_b`` under which no latent can be in row b's top k of ``r``
   (``_candidates``); the latents at or above it are the candidates;
4. ``r`` of the candidates (a sampled fp32 matmul), and their top k with the tie rule of
   `select.topk_lower_index` (value descending, then lower index).

The result is exactly the top k of ``r`` over all latents: only an fp32 rounding-order
difference (~1e-7 relative, as between two BLAS libraries) separates ``r`` from the dense
product's values, so the two paths can disagree only between latents whose pre-activations
tie to within that rounding. AuxK's selection among dead latents ranks their fp32
pre-activations, from a matmul over their columns only. Mutual Choice's batch-wide top k·B
and Feature Choice's per-latent top m_j are screened the same way, with one threshold for
the batch or one a latent (screen_batch.py).

The bound. With u = 2^-8 (bf16 round-to-nearest), x~ = bf16(x) and so on, s the exact
``x.w + b`` and gamma = K u32 / (1 - K u32) (fp32 sums of K terms in any order, u32 = 2^-24):

    |s - (x~.w~ + b~)|        <= |x| |w - w~| + |x - x~| |w~| + |b - b~|      (Cauchy-Schwarz)
    |p - (x~.w~ + b~)|        <= gamma (|x~| |w~| + |b~|)     p: the matmul's fp32 sum
    |r - s|                   <= gamma (|x| |w| + |b|)
    |a - p|                   <= u' |a|,  u' = 2u / (1 - 2u)   a = bf16(p), even if the
                                                               conversion truncates

so ``|r - a| <= E_b + u'|a|`` with E_b taking each column quantity at its maximum over
latents (``Dw = max |w - w~|``, ``Nw = max |w|``, ``Db``, ``Nb``), inflated by 2^-10 for the
rounding of E itself (computed in float64; the norms are fp32 ones bounded from above
for their rounding and underflow, `_norm_upper`), plus 2^-126 (sqrt(K) (|x| + Nw)(1 + u) + 2K + 2)
for the denormal inputs, products, sums and outputs that AMX (or a flush-denormal setting)
flushes to zero.

The threshold. Take k strided super-groups of ``a`` (as in `select._hierarchical`) and G the
smallest of k values, one from each: k distinct latents have ``a >= G``, so the k-th
largest ``r`` is at least ``L = G - u'|G| - E`` (``a - u'|a|`` grows with ``a``). A latent with
``a + u'|a| + E < L`` has ``r < L``: it is below the k-th value and cannot be selected, not
even through a tie. The candidates are therefore ``a >= tau = f^-1(L - E)`` with
``f(a) = a + u'|a|``, compared in bf16 after rounding tau down. Every row has at least k.

The bound assumes the bf16 matmul accumulates in fp32, which PyTorch does not promise: a
probe (`bf16_accumulates_in_fp32`, once per process at the screen's first use) checks it on
products that a bf16-rounded partial sum would take outside the bound. Where it fails,
impl="screen" is refused and impl="auto" keeps the fp32 path (encoder.encoder_impl).

Falls back to the plain fp32 path when the bound or a threshold is not finite (inf or NaN
anywhere, or a product beyond bf16's range). A row with more than 16k candidates (its
top-k values sit within the bound of each other, e.g. x = b_dec with b_enc = 0) takes the
fp32 product alone; when every row does, the whole batch does.
"""

from __future__ import annotations

import logging
import math
import threading
from functools import lru_cache

import torch
from torch import Tensor

from .select import strided_group_max, keyed_topk, topk_lower_index
from .sparse_rows import row_pointers, sampled_addmm_csr

log = logging.getLogger("saekit.kernels")

_U = 2.0 ** -8                 # bf16 unit roundoff
_U_OUT = 2 * _U / (1 - 2 * _U)  # |a - p| <= _U_OUT |a| for a = bf16(p), rounded either way
GROUP = 8                     # level-1 strided groups, as select._hierarchical
ROW_CAP = 16                  # rows with more than 16 k candidates take the fp32 product
_COL_BLOCK = 512               # W rows per block when bounding bf16's rounding of W

_tls = threading.local()


@lru_cache(maxsize=None)
def amx_available() -> bool:
    """True when this CPU has AMX tiles, which make bf16 matmuls several times faster than fp32
    (benchmarks/RESULTS.md, "With the bf16-screened encoder")."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def pays(x: Tensor, W_enc: Tensor, k: int) -> bool:
    """Whether impl="auto" screens: fp32 on a CPU with AMX, at sizes where it is faster.

    The fp32 product it saves grows with d_in·d_sae, the rescoring with k·d_in. The bounds
    follow benchmarks/screen.py's screen time / fp32 time on 2 cores (benchmarks/RESULTS.md,
    "With the bf16-screened encoder", two runs): a clear gain at d_in=768, d_sae >= 12288,
    k <= 64 and at d_in=256, d_sae=4096, much less at k=128; shapes with d_sae <= 2048 went
    from slower to faster between runs, so they stay on the fp32 path."""
    B, d_in = x.shape
    d_sae = W_enc.shape[1]
    return (x.device.type == "cpu" and x.dtype == W_enc.dtype == torch.float32 and B >= 1024
            and d_in >= 256 and d_sae >= max(4096, 128 * k) and amx_available())


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A reused per-thread buffer (see encoder._workspace), zero-filled when made."""
    buf = getattr(_tls, name, None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        with torch.inference_mode(False):
            buf = torch.zeros(shape, dtype=dtype)
        setattr(_tls, name, buf)
    return buf


def _padded_k(d_in: int) -> int:
    """The matmul's inner size: d_in, a column of ones for b_enc, zeros up to a multiple of 16."""
    return -(-(d_in + 1) // 16) * 16


def _norm_upper(s: Tensor, n: int) -> Tensor:
    """An upper bound, in float64, on the true 2-norms whose fp32 value ``vector_norm`` gave
    as ``s`` for vectors of ``n`` entries: its rounding (< (n + 2) u32 relative) and squares
    below fp32's normal range (each off by < 2^-126 even when flushed to zero) can only make
    it smaller than the true norm, by at most what this adds back."""
    s = s.double()
    return (s.square() + n * 2.0 ** -126).sqrt() * (1 + 2 * (n + 2) * 2.0 ** -24)


def _column_bounds(W_T: Tensor, b: Tensor, Wa: Tensor) -> tuple[float, float, float, float]:
    """Fill ``Wa`` [d_sae, K] bf16 with [W_enc^T | b_enc | 0] and return (Dw, Nw, Db, Nb):
    max_j |w_j - bf16(w_j)|, max_j |w_j|, max |b - bf16(b)|, max |b| (2-norms over d_in,
    bounded from above: `_norm_upper`). In blocks of rows, so that the difference stays in
    cache."""
    d_in = W_T.shape[1]
    Wa[:, :d_in].copy_(W_T)
    Wa[:, d_in].copy_(b)
    Wa[:, d_in + 1:].zero_()  # the buffer may come from a call with a smaller d_in
    diff = _buffer("diff", (min(_COL_BLOCK, len(W_T)), d_in), torch.float32)
    norm_d, norm_w = W_T.new_empty(len(W_T)), W_T.new_empty(len(W_T))
    blocks = zip(W_T.split(_COL_BLOCK), Wa[:, :d_in].split(_COL_BLOCK), norm_d.split(_COL_BLOCK),
                 norm_w.split(_COL_BLOCK))
    for Wb, Ab, nd, nw in blocks:
        torch.linalg.vector_norm(diff[: len(Wb)].copy_(Ab).sub_(Wb), dim=1, out=nd)
        torch.linalg.vector_norm(Wb, dim=1, out=nw)
    Dw, Nw = (float(_norm_upper(t.max(), d_in)) for t in (norm_d, norm_w))
    Db = float((b - Wa[:, d_in]).abs().max())
    return Dw, Nw, Db, float(b.abs().max())


def _row_bounds(xc: Tensor, xa: Tensor, cols: tuple[float, float, float, float]) -> Tensor:
    """Fill ``xa`` [B, K] bf16 with [bf16(xc) | 1 | 0] and return E [B] float64 (module
    docstring)."""
    Dw, Nw, Db, Nb = cols
    d_in = xc.shape[1]
    xa[:, :d_in].copy_(xc)
    xa[:, d_in] = 1
    xa[:, d_in + 1:].zero_()  # the buffer may come from a call with a smaller d_in
    xn = _norm_upper(torch.linalg.vector_norm(xc, dim=1), d_in)
    dxn = _norm_upper(torch.linalg.vector_norm(xc - xa[:, :d_in], dim=1), d_in)
    K = xa.shape[1]
    gamma = K * 2.0 ** -24 / (1 - K * 2.0 ** -24)
    one = 1 + _U
    E = xn * Dw + dxn * (Nw * one) + Db + 2 * gamma * one * (xn * (one * Nw) + Nb)
    # Denormals flushed to zero: inputs (sqrt(K) term), products and partial sums of either
    # product (2K; torch.set_flush_denormal may flush the fp32 rescoring too), outputs (2).
    flushed = 2.0 ** -126 * (K ** 0.5 * one * (xn + Nw) + 2 * K + 2)
    return (E + flushed) * (1 + 2.0 ** -10)


def threshold(G: Tensor, E_G: Tensor | float, E: Tensor) -> Tensor:
    """tau (module docstring) from G [B], the bound E_G that holds for the latents behind G
    and E [B] float64 (TopK: E_G = E; a batch-wide G: the largest E of the rows behind it),
    rounded down to bf16."""
    G = G.double()
    L = G - _U_OUT * G.abs() - E_G - E                 # L - E
    tau = torch.where(L >= 0, L / (1 + _U_OUT), L / (1 - _U_OUT))
    t = tau.bfloat16()
    return torch.where(t.double() > tau, torch.nextafter(t, torch.full_like(t, -math.inf)), t)


def _candidates(a: Tensor, k: int, E: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(rows, cols, dense): every latent of ``a`` [B, n] bf16 that can be in its row's top k,
    rows ascending, except in the rows ``dense`` [int64] that have more than
    ``ROW_CAP·k`` (or, defensively, fewer than k) candidates: those are left to the fp32
    product. None when a threshold is not finite (a value beyond bf16's range)."""
    B, n = a.shape
    n1, n_super = n // GROUP, 4 * k
    cap = ROW_CAP * k
    if n1 < 2 * n_super:  # too narrow for groups: rank and compare the whole rows
        tau = threshold(a.topk(k, dim=1, sorted=False).values.amin(1), E, E)
        if not bool(torch.isfinite(tau).all()):
            return None
        rows, cols, dense = _cap_rows(*(a >= tau[:, None]).nonzero(as_tuple=True), B, k, cap)
        return rows, cols, dense.nonzero().flatten()
    gm1 = group_maxima(a)                                              # [B, n1]
    per = n1 // n_super
    gm2 = gm1[:, : per * n_super].unflatten(1, (per, n_super)).amax(1)  # [B, n_super]
    # k super-groups, each holding a value >= its reported one: G is a k-th value lower bound.
    tau = threshold(gm2.topk(k, dim=1, sorted=False).values.view(torch.bfloat16).amin(1), E, E)
    if not bool(torch.isfinite(tau).all()):
        return None
    rows, cols, dense = members(a, gm1, tau, cap)
    rows, cols, short = _cap_rows(rows, cols, B, k, cap)
    return rows, cols, (dense | short).nonzero().flatten()


def group_maxima(a: Tensor) -> Tensor:
    """Maxima of the raw bits of ``a`` [B, n] bf16 as int16 over strided groups of 8
    (`select.strided_group_max`), [B, n // 8]: faster than over the bf16 values
    (benchmarks/RESULTS.md, "Figures moved from docstrings"). Bits order
    like values among non-negative numbers and below them come all negative ones, so a
    group's bit maximum is its value maximum whenever the group holds a value >= +0.0, and
    otherwise one of its (negative) values. Either way it is one of the group's values."""
    return strided_group_max(a.view(torch.int16), GROUP)


def members(a: Tensor, gm1: Tensor, tau: Tensor, cap: int | None = None,
             total: int | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """(rows, cols) of every entry of ``a`` [B, n] bf16 >= tau [B] bf16, rows ascending,
    found through the group maxima ``gm1``: bit maxima (`group_maxima`, int16) or value
    maxima (bf16); with ``cap``, rows with more than ``cap`` of them are left out and marked
    in the bool [B] returned third. None when there are more than ``total`` of them."""
    B, n = a.shape
    n1 = gm1.shape[1]
    if gm1.dtype == torch.bfloat16:
        hit = gm1 >= tau[:, None]
    else:
        # A group can hold a member only if its maximum is >= tau. Where tau > 0 the bit
        # maxima decide it (in bits: tau's bits are positive); other rows take value maxima.
        hit = gm1 >= tau.view(torch.int16)[:, None]
        low = (tau <= 0).nonzero().flatten()
        if low.numel():
            hit[low] = strided_group_max(a[low], GROUP) >= tau[low, None]
    if total is not None and int(torch.count_nonzero(hit)) > total:  # each hit group holds a member
        return None
    # Each hit group holds a member, so rows with more than cap of them are out already.
    r, g, dense = _cap_rows(*hit.nonzero(as_tuple=True), B, 0, n if cap is None else cap)
    vals = a[:, : n1 * GROUP].unflatten(1, (GROUP, n1))[r, :, g]  # [P, GROUP]: g + n1*m
    hit = (vals >= tau[r, None]).view(-1).nonzero().flatten()
    p, m = hit // GROUP, hit % GROUP
    rows, cols = r[p], g[p] + n1 * m
    if n1 * GROUP < n:  # columns in no group
        tr, tc = (a[:, n1 * GROUP:] >= tau[:, None]).nonzero(as_tuple=True)
        keep = ~dense[tr]
        rows, order = torch.cat([rows, tr[keep]]).sort(stable=True)
        cols = torch.cat([cols, tc[keep] + n1 * GROUP])[order]
    return rows, cols, dense


def _cap_rows(rows: Tensor, cols: Tensor, B: int, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
    """Drop the pairs of rows with fewer than ``lo`` or more than ``hi`` of them:
    (rows, cols, bool [B] marking the rows dropped)."""
    count = torch.bincount(rows, minlength=B)
    dense = (count < lo) | (count > hi)
    if bool(dense.any()):
        keep = ~dense[rows]
        rows, cols = rows[keep], cols[keep]
    return rows, cols, dense


def rescore(left: Tensor, right: Tensor, bias: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """``bias + left[rows] . right[:, cols]`` for each pair (rows ascending), in fp32: a
    sampled matmul. With left = xc, right = W_enc and bias = b_enc[cols], the candidates'
    pre-activations; with left = W_enc^T, right = xc^T, the same numbers latent by latent.
    Returns (values [nnz], crow [R + 1] where each row's pairs start)."""
    crow = row_pointers(rows, left.shape[0])
    return sampled_addmm_csr(crow, cols, bias, left, right), crow


def _rescored_topk(xc: Tensor, W_enc: Tensor, b: Tensor, rows: Tensor, cols: Tensor, k: int):
    """fp32 pre-activations of the candidates, then each row's top k by (value desc, index
    asc): (values [B, k] fp32, indices [B, k] int64)."""
    B = xc.shape[0]
    r, crow = rescore(xc, W_enc, b[cols], rows, cols)
    C = int((crow[1:] - crow[:-1]).max())
    slot = torch.arange(len(rows)) - crow[rows]
    V = torch.full((B, C), -math.inf)
    I = torch.full((B, C), W_enc.shape[1], dtype=torch.int64)
    V[rows, slot], I[rows, slot] = r, cols
    if C == k:
        return keyed_topk(V, I, k)
    v, p = V.topk(k + 1, dim=1)
    i = I.gather(1, p)
    # Equal neighbours among the top k+1: the order or the cut needs the index rule.
    tie = (v[:, 1:] == v[:, :-1]).any(1).nonzero().flatten()
    v, i = v[:, :k], i[:, :k]
    if tie.numel():
        v[tie], i[tie] = keyed_topk(V[tie], I[tie], k)
    return v, i


def screen_product(xc: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[Tensor, Tensor] | None:
    """The bf16 product ``a`` [B, d_sae] and the bound E [B] (module docstring), or None
    (logged) where the bound is not finite."""
    B, d_in = xc.shape
    d_sae = W_enc.shape[1]
    K = _padded_k(d_in)
    Wa = _buffer("Wa", (d_sae, K), torch.bfloat16)
    xa = _buffer("xa", (B, K), torch.bfloat16)
    cols = _column_bounds(W_enc.t(), b_enc, Wa)
    E = _row_bounds(xc, xa, cols)
    if not (math.isfinite(sum(cols)) and bool(torch.isfinite(E).all())):
        return fallback("a non-finite input or weight")
    return _bf16_mm(xa, Wa.t(), out=_buffer("a", (B, d_sae), torch.bfloat16)), E


def _bf16_mm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """The screen's bf16 product ``a @ b`` into ``out`` (the probe checks this call)."""
    return torch.mm(a, b, out=out)


_PROBE_D_IN = 1023  # pads to an inner size of 1024 (`_padded_k`), past common K blocks


@lru_cache(maxsize=None)
def bf16_accumulates_in_fp32() -> bool:
    """Whether this platform's bf16 matmul keeps within the bound on a probe, [256, 1023] x
    [1023, 512]: every entry of `screen_product`'s ``a`` within ``E + u'|a|`` of the exact
    product (cached per process; one shape, so a library whose accumulation changes with
    the shape could still differ elsewhere).

    The probe's first 64 rows and columns pair up: row i is +1 and -1 at two random
    positions and 3·2^-10 at two more, column i is 1 at those four, so the exact product is
    6·2^-10. A partial sum holding one of the +-1 but not the other, rounded to bf16
    (half an ulp: 2^-8), loses the small terms: an error of at least 2^-10, where the bound
    allows ~5e-4 (E, with inputs exact in bf16, is only the fp32 rounding term). The other
    rows and columns are random, bf16-exact."""
    g = torch.Generator().manual_seed(0)
    d_in, n = _PROBE_D_IN, 64
    x = torch.randn(256, d_in, generator=g).bfloat16().float()
    W_T = (torch.randn(512, d_in, generator=g) / d_in**0.5).bfloat16().float()
    pos = torch.stack([torch.randperm(d_in, generator=g)[:4] for _ in range(n)])  # [n, 4]
    x[:n], W_T[:n] = 0, 0
    x[:n].scatter_(1, pos, torch.tensor([1.0, -1.0, 3 * 2.0**-10, 3 * 2.0**-10]).expand(n, 4))
    W_T[:n].scatter_(1, pos, 1.0)
    with torch.no_grad():
        a, E = screen_product(x, W_T.t(), torch.zeros(512))
    a = a.double()
    err = (x.double() @ W_T.double().t() - a).abs()
    ok = bool((err <= E[:, None] + _U_OUT * a.abs()).all())
    log.info("bf16 matmul accumulation probe: %s (largest error / bound %.3g)", "passed" if ok else "FAILED",
             float((err / (E[:, None] + _U_OUT * a.abs())).max()))
    return ok


@torch.no_grad()
def screened_select(xc: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """`reference.topk` of the pre-activations ``xc @ W_enc + b_enc`` on the screen: (values,
    indices) [B, k], ties to the lower index, ReLU not yet applied; or None where the screen
    cannot certify its result (the caller then runs the fp32 path). xc [B, d_in], W_enc
    [d_in, d_sae], b_enc [d_sae]: fp32 CPU tensors."""
    B = xc.shape[0]
    product = screen_product(xc, W_enc, b_enc)
    if product is None:
        return None
    a, E = product  # [B, d_sae] bf16, [B]
    found = _candidates(a, k, E)
    if found is None:
        return fallback("a pre-activation beyond bf16's range")
    rows, cand, dense = found
    if len(dense) == B:
        return fallback(f"every row has more than {ROW_CAP}·k candidates")
    values, indices = _rescored_topk(xc, W_enc, b_enc, rows, cand, k)
    if len(dense):  # rows the bound cannot narrow (e.g. x = b_dec with b_enc = 0): fp32
        fallback(f"rows with more than {ROW_CAP}·k candidates take the fp32 product")
        values[dense], indices[dense] = topk_lower_index(torch.addmm(b_enc, xc[dense], W_enc), k)
    return values, indices


_logged: set[str] = set()


def fallback(why: str) -> None:
    """Log (once per reason) that the screen gave up on a batch or some of its rows, which
    then take the fp32 product."""
    if why not in _logged:
        _logged.add(why)
        log.info("impl='screen' fell back to the fp32 path: %s", why)
