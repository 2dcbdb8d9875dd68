"""Mutual and Feature Choice's batch-level selections on the bf16 screen (impl="screen").

The same product, bound and rescoring as the TopK encoder's screen (screen.py, whose
docstring derives them), with thresholds that hold for the whole batch (Mutual Choice's top
k·B) or for one latent over the batch (Feature Choice's top m_j) instead of for one row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .screen import (GROUP, ROW_CAP, fallback, group_maxima, members, rescore, screen_product,
                     threshold)
from .reference import pre_columns
from .select import column_topk, global_topk, strided_group_max
from .sparse_rows import row_pointers


def _product(xc: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """screen.screen_product's (a, E), then the rows whose bound exceeds twice the median
    and the largest bound of the other rows: (a, E, outliers, E_in); None where the bound
    is not finite.

    Batch-wide thresholds hold for every row, so one token of outsized norm (a BOS-like
    token) would widen them for all. Its row is instead computed exactly in fp32 and joins
    the candidates whole; the thresholds use the others' bound."""
    product = screen_product(xc, W_enc, b_enc)
    if product is None:
        return None
    a, E = product
    out = E > 2 * E.median()
    return a, E, out.nonzero().flatten(), E[~out].max()


def _exact_rows(xc: Tensor, W_enc: Tensor, b_enc: Tensor, rows: Tensor, cols: Tensor | None = None):
    """All pairs of ``rows`` × ``cols`` (default: every latent) with their fp32
    pre-activations: (rows, cols, values), rows ascending."""
    pre = torch.addmm(b_enc, xc[rows], W_enc)  # [len(rows), d_sae]
    if cols is None:
        cols = torch.arange(W_enc.shape[1])
    else:
        pre = pre[:, cols]
    return rows.repeat_interleave(len(cols)), cols.repeat(len(rows)), pre.reshape(-1)


@torch.no_grad()
def screened_global_topk(xc: Tensor, W_enc: Tensor, b_enc: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """`select.global_topk` of the pre-activations ``xc @ W_enc + b_enc``, on the screen:
    (rows, cols, values) of the batch's n largest fp32 pre-activations (Mutual Choice), in no
    particular order, which of several equal values at the cut are kept unspecified; or None
    where the screen cannot certify its result (the caller then runs the fp32 path).

    The threshold is batch-wide: the n largest group maxima (bit maxima, `group_maxima`,
    unless the smallest of them is not positive: value maxima) of the rows that are not
    outliers (`_product`; those are computed exactly) come from n distinct groups, each
    holding a value >= the smallest of them, G. The n-th largest r is then at least
    ``G - u'|G| - E_in`` (E_in: the largest bound of those rows), and row b's candidates are
    ``a >= tau_b = f^-1(G - u'|G| - E_in - E_b)`` (module docstring)."""
    B = xc.shape[0]
    if n > B * (W_enc.shape[1] // GROUP):  # fewer groups than entries to keep
        return fallback("more entries to keep than groups")
    product = _product(xc, W_enc, b_enc)
    if product is None:
        return None
    a, E, out, E_in = product
    gm1 = group_maxima(a)
    gm_G = gm1.index_fill(0, out, torch.iinfo(torch.int16).min) if len(out) else gm1
    G = global_topk(gm_G, n)[2].view(torch.bfloat16).amin()
    if G <= 0:  # the batch's n-th value is not positive: bit maxima would rank it badly
        gm1 = strided_group_max(a, GROUP).index_fill_(0, out, -math.inf)
        G = global_topk(gm1, n)[2].amin()
    tau = threshold(G.expand(B), E_in, E).index_fill_(0, out, math.inf)  # outliers: exact below
    if not bool(torch.isfinite(tau.index_fill(0, out, 0)).all()):
        return fallback("a pre-activation beyond bf16's range")
    found = members(a, gm1, tau, total=ROW_CAP * n)
    if found is None:
        return fallback(f"more than {ROW_CAP}·n candidates")
    rows, cols, _ = found
    if len(out):  # (only an infinite a could have made them members)
        keep = torch.ones(B, dtype=torch.bool).index_fill_(0, out, False)[rows]
        rows, cols = rows[keep], cols[keep]
    r = rescore(xc, W_enc, b_enc[cols], rows, cols)[0]
    if len(out):
        orows, ocols, o = _exact_rows(xc, W_enc, b_enc, out)
        rows, cols, r = torch.cat([rows, orows]), torch.cat([cols, ocols]), torch.cat([r, o])
    top = r.topk(n, sorted=False)
    return rows[top.indices], cols[top.indices], top.values


def _column_thresholds(a: Tensor, out: Tensor, E_in: Tensor, m: Tensor, narrow: Tensor, B1: int
                       ) -> tuple[Tensor, Tensor] | None:
    """Feature Choice's per-latent thresholds on the screen: (H, tau), H [d_sae, B1] the value
    maxima of ``a`` over the B1 groups of 8 consecutive tokens, tau [d_sae] latent j's
    candidate threshold ``f^-1(G_j - u'|G_j| - 2 E_in)`` (G_j: the m[j]-th largest of H[j]
    over the groups with no outlier token of ``out``), inf for the latents not ``narrow``;
    None where a narrow latent's threshold is not finite."""
    H = a[: B1 * GROUP].unflatten(0, (B1, GROUP)).amax(1).t().contiguous()  # [d_sae, B1] value maxima
    out_groups = out[out < B1 * GROUP] // GROUP
    M = int(m[narrow].max())
    H_G = H.index_fill(1, out_groups, -math.inf) if len(out) else H
    G = H_G.topk(M, dim=1).values.gather(1, (m.clamp(max=M) - 1)[:, None])[:, 0]  # [d_sae]
    tau = threshold(G, E_in, E_in.expand(H.shape[0]))
    if not bool(torch.isfinite(tau[narrow]).all()):
        return fallback("a pre-activation beyond bf16's range")
    return H, torch.where(narrow, tau, math.inf)  # the wide latents are ranked apart, in fp32


def _column_candidates(a: Tensor, H: Tensor, tau: Tensor, B1: int, cap: int) -> tuple[Tensor, Tensor] | None:
    """(rows, cols), latents ascending, of the entries of ``a`` (among the first B1 groups of
    8 tokens) with ``a >= tau[col]``, looked for in the groups whose maximum ``H`` reaches
    tau; None where more than ``cap`` groups do (each such group holds a candidate)."""
    hit = H >= tau[:, None]
    if int(torch.count_nonzero(hit)) > cap:
        return fallback(f"more than {ROW_CAP}·m candidates")
    j, g = hit.nonzero(as_tuple=True)                                # candidate (latent, group), j ascending
    vals = a[: B1 * GROUP].view(B1, GROUP, H.shape[0])[g, :, j]    # [P, GROUP]
    hit = (vals >= tau[j, None]).view(-1).nonzero().flatten()
    p, t = hit // GROUP, hit % GROUP
    return g[p] * GROUP + t, j[p]


def _column_tops(rows: Tensor, cols: Tensor, r: Tensor, m: Tensor, d_sae: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Of the candidates (rows, cols) with fp32 values ``r``, each latent j's ``m[j]`` largest:
    (rows, cols, values) by latent ascending, then value descending, and ``smallest``
    [d_sae], each latent's m[j]-th value where it has that many candidates (the other
    entries left unset)."""
    # Per latent, its candidates by value descending (one sort of int64 keys: the latent,
    # then the value's bits flipped into descending order); keep the first m[j].
    bits = r.view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 order = value order
    order = ((cols << 32) - bits.long()).argsort()
    rows, cols, r = rows[order], cols[order], r[order]
    pos = torch.arange(len(cols)) - row_pointers(cols, d_sae)[cols]
    keep = pos < m[cols]
    smallest = torch.empty(d_sae)
    last = keep & (pos == m[cols] - 1)
    smallest[cols[last]] = r[last]
    return rows[keep], cols[keep], r[keep], smallest


@torch.no_grad()
def screened_column_topk(xc: Tensor, W_enc: Tensor, b_enc: Tensor, m: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """`select.column_topk` of the pre-activations ``xc @ W_enc + b_enc``, on the screen:
    for each latent j its ``m[j]`` largest fp32 pre-activations over the batch (Feature
    Choice), as (rows, cols, values) and ``smallest`` [d_sae], each latent's m[j]-th value;
    which of several equal values at a latent's cut are kept is unspecified. None where the
    screen cannot certify its result (the caller then runs the fp32 path).

    Thresholds are per latent: the value maxima of ``a`` over groups of 8 consecutive
    tokens, and G_j the m[j]-th largest of latent j's among groups with no outlier token
    (`_product`; those tokens are computed exactly): m[j] distinct groups, each holding a
    value >= G_j, so latent j's m[j]-th largest r is at least ``G_j - u'|G_j| - E_in`` and
    its candidates are ``a >= tau_j = f^-1(G_j - u'|G_j| - 2 E_in)`` (module docstring).
    Latents with m[j] above a quarter of the groups rank their fp32 column."""
    B, d_sae = xc.shape[0], W_enc.shape[1]
    B1 = B // GROUP
    narrow = m <= B1 // 4
    if not bool(narrow.any()):
        return fallback("every latent keeps more than a quarter of the token groups")
    product = _product(xc, W_enc, b_enc)
    if product is None:
        return None
    a, _, out, E_in = product
    thresholds = _column_thresholds(a, out, E_in, m, narrow, B1)
    if thresholds is None:
        return None
    cap = ROW_CAP * int(m[narrow].sum())
    found = _column_candidates(a, *thresholds, B1, cap)
    if found is None:
        return None
    rows, cols = found
    tail = torch.arange(B1 * GROUP, B)  # tokens in no group, computed exactly with the outliers
    exact = torch.cat([out[out < B1 * GROUP], tail])
    if len(exact):
        keep = torch.ones(B, dtype=torch.bool).index_fill_(0, exact, False)[rows]
        rows, cols = rows[keep], cols[keep]
    if len(rows) > cap:
        return fallback(f"more than {ROW_CAP}·m candidates")
    r = rescore(W_enc.t(), xc.t(), b_enc[cols], cols, rows)[0]  # by latent: W_enc^T rows . xc
    if len(exact):
        erows, ecols, e = _exact_rows(xc, W_enc, b_enc, exact, narrow.nonzero().flatten())
        rows, cols, r = torch.cat([rows, erows]), torch.cat([cols, ecols]), torch.cat([r, e])
    rows, cols, values, smallest = _column_tops(rows, cols, r, m, d_sae)
    wide = (~narrow).nonzero().flatten()
    if len(wide):  # fp32 columns for the latents that keep many tokens
        wr, wc, wv, ws = column_topk(pre_columns(xc, W_enc, b_enc, wide), m[wide])
        rows, cols, values = torch.cat([rows, wr]), torch.cat([cols, wide[wc]]), torch.cat([values, wv])
        smallest[wide] = ws
    return rows, cols, values, smallest
