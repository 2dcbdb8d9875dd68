"""Exact per-row top-k with saekit's tie rule: among equal values the lower index wins.

torch.topk does not promise an order among ties (on CPU it uses std::partial_sort or
std::nth_element per row, so tied latents come out arbitrarily), and saekit needs the torch
and Triton paths to agree index for index. The rule is made exact with 64-bit keys

    key = (order_preserving_int32(value) << 32) | (2**32 - 1 - index)

whose order is "value descending, then index ascending" and which are all distinct. The
Triton encoder kernel builds the same keys (encoder_triton.py), so both paths rank alike.

Building keys for a whole [B, d_sae] matrix is slow on CPU, so `topk_lower_index` ranks the
plain values and only re-ranks with keys (a) the k selected entries, to order them, and
(b) the rare rows with a tie at the k-th place. For large rows on CPU it also avoids running
torch.topk over every element (see `_hierarchical`), which there costs a sizeable share of
the encoder matmul's own time at d_in=768 (benchmarks/cpu_kernels.py;
benchmarks/RESULTS.md, "The selections beside their alternatives" and "Figures moved from
docstrings").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOW32 = 0xFFFFFFFF
# Rows of keys built at once in the exact fallback: bounds its memory to ~32 MB of int64.
_KEY_CHUNK = 1 << 22


def pack_keys(values: Tensor, indices: Tensor) -> Tensor:
    """int64 keys ordering (value desc, index asc); values any float dtype, indices < 2**32.

    -0.0 is folded to +0.0 so the two compare equal, as they do as floats. NaN is not handled.
    """
    bits = values.float().view(torch.int32)
    bits = torch.where(bits == torch.iinfo(torch.int32).min, 0, bits)  # -0.0 -> +0.0
    # Flip the magnitude bits of negatives so that signed int32 order equals float order.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.long() << 32) | (_LOW32 - indices)


def unpack_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `pack_keys`: (values fp32, indices int64)."""
    bits = (keys >> 32).to(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.view(torch.float32), _LOW32 - (keys & _LOW32)


def keyed_topk(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of (value, index) pairs along dim 1 by key: exact, ties to the lower index, sorted."""
    _, pos = pack_keys(values, indices).topk(k, dim=1)
    return values.gather(1, pos), indices.gather(1, pos)


def _exact_rows(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keyed top-k over whole rows (the slow, always-exact path), in row chunks."""
    n = scores.shape[1]
    step = max(1, _KEY_CHUNK // n)
    ar = torch.arange(n, device=scores.device)
    parts = [keyed_topk(rows, ar.expand_as(rows), k) for rows in scores.split(step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _finish(scores: Tensor, k: int, v: Tensor, i: Tensor, tie: Tensor) -> tuple[Tensor, Tensor]:
    """v, i: the k selected per row, values sorted descending. Put equal values in index
    order (only rows with such a tie: keys cost ~10 passes) and redo the rows with a tie at
    the k-th place exactly."""
    inner = ((v[:, 1:] == v[:, :-1]).any(1) & ~tie).nonzero().flatten()
    if inner.numel():
        v[inner], i[inner] = keyed_topk(v[inner], i[inner], k)
    bad = tie.nonzero().flatten()
    if bad.numel():
        v[bad], i[bad] = _exact_rows(scores[bad], k)
    return v, i


def _direct(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk over whole rows, taking k+1 to detect a tie at the k-th place."""
    n = scores.shape[1]
    if k == n:
        ar = torch.arange(n, device=scores.device).expand_as(scores)
        return keyed_topk(scores, ar, k)
    v, i = scores.topk(k + 1, dim=1)
    return _finish(scores, k, v[:, :k], i[:, :k], v[:, k - 1] == v[:, k])


def strided_group_max(scores: Tensor, group: int) -> Tensor:
    """Maxima over strided groups along dim 1, [R, n1] with n1 = C // group: group c holds
    columns c, c + n1, ..., c + (group - 1)·n1 (a vectorized reduction over `group`
    contiguous slices); the columns from n1·group on are in no group."""
    n1 = scores.shape[1] // group
    return scores[:, : n1 * group].unflatten(1, (group, n1)).amax(1)


def _hierarchical(scores: Tensor, k: int, group: int, n_super: int) -> tuple[Tensor, Tensor]:
    """Exact top-k that runs torch.topk on ~1/16 of the elements instead of all of them.

    Level 1: strided groups of `group` elements (latent j in group j mod n1, which makes the
    max a cheap vectorized reduction over `group` contiguous slices). Level 2: `n_super`
    strided super-groups of level-1 groups. Keep the top-k super-groups, then the top-k
    level-1 groups inside them, then the top-k elements of those. Each level keeps every
    element >= the k-th largest value: if the k kept groups' maxima are all >= t, there are k
    distinct elements >= t, so the answer's k-th value v_k >= t, and a dropped group (max < t
    when there is no tie at the cut) holds nothing >= v_k. A tie at any cut sends the row to
    the exact path. Elements outside the grouped prefix are always candidates.
    """
    B, n = scores.shape
    dev = scores.device
    n1 = n // group                      # level-1 groups
    per_super = n1 // n_super            # level-1 groups per super-group
    gm1 = strided_group_max(scores, group)  # [B, n1]
    gm2 = gm1[:, : per_super * n_super].unflatten(1, (per_super, n_super)).amax(1)  # [B, n_super]
    v2, s2 = gm2.topk(k + 1, dim=1)
    tie = v2[:, k - 1] == v2[:, k]

    g1 = (s2[:, :k, None] + n_super * torch.arange(per_super, device=dev)).flatten(1)  # [B, k*per_super]
    if per_super * n_super < n1:  # level-1 groups left out of the super-groups
        g1 = torch.cat([g1, torch.arange(per_super * n_super, n1, device=dev).expand(B, -1)], 1)
    v1, p1 = gm1.gather(1, g1).topk(k + 1, dim=1)
    tie |= v1[:, k - 1] == v1[:, k]
    g1 = g1.gather(1, p1[:, :k])

    cand_BC = (g1[:, :, None] + n1 * torch.arange(group, device=dev)).flatten(1)  # [B, k*group]
    if n1 * group < n:  # the tail that is in no group
        cand_BC = torch.cat([cand_BC, torch.arange(n1 * group, n, device=dev).expand(B, -1)], 1)
    v, p = scores.gather(1, cand_BC).topk(k + 1, dim=1)
    tie |= v[:, k - 1] == v[:, k]
    return _finish(scores, k, v[:, :k], cand_BC.gather(1, p[:, :k]), tie)


def topk_lower_index(
    scores: Tensor, k: int, *, group: int = 8, n_super: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row top-k of `scores` [R, n]: (values [R, k] in scores' dtype, indices [R, k] int64).

    Sorted by value descending; among equal values the lower index comes first and wins the
    last place. Same result as `keyed_topk(scores, arange(n), k)`, computed faster.
    `group`/`n_super` (default 4k) shape the CPU hierarchical path; tests shrink them to
    exercise it on small rows. Defaults from a sweep at B=4096, n=12288, k=32 on one core
    (benchmarks/cpu_kernels.py), against a bare torch.topk (benchmarks/RESULTS.md, "Figures
    moved from docstrings").
    """
    R, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    n_super = 4 * k if n_super is None else n_super
    # Needs >= 2 level-1 groups per super-group and > k super-groups. On CUDA torch.topk is
    # a radix select whose cost does not hinge on k the same way: keep it there.
    if scores.device.type == "cpu" and n // group >= 2 * n_super and n_super > k:
        return _hierarchical(scores, k, group, n_super)
    return _direct(scores, k)


def global_topk(scores: Tensor, n: int, *, group: int = 8, sample_step: int = 17, margin: float = 1.25,
                fast_from: int = 1 << 20) -> tuple[Tensor, Tensor, Tensor]:
    """The ``n`` largest entries of the whole matrix ``scores`` [R, C]: (rows, cols, values),
    in no particular order; which of several equal values at the cut are kept is unspecified.

    Mutual Choice keeps the batch's k·B largest pre-activations: n = 131,072 of 50 million at
    B=4096, d_sae=12288, where ``torch.topk`` over the flattened matrix is slow on CPU
    (benchmarks/RESULTS.md, "The selections beside their alternatives"). Instead (matrices
    of at least ``fast_from`` entries):

    1. group maxima ``gm`` [R, C // group] over strided groups of ``group`` columns
       (`strided_group_max`, as in `_hierarchical`; columns in no group are always candidates);
    2. a threshold ``t``: the ``margin·n/sample_step``-th largest of every ``sample_step``-th
       group maximum, an estimate of the n-th largest group maximum from below;
    3. if at least n groups have a maximum >= t, there are n distinct entries >= t, so the
       answer's n-th value is >= t and every entry of the answer lies in such a group:
       gather those groups' entries that are >= t and take their top n.

    Exact whenever step 3's count holds; when it does not (an unlucky sample), or when
    more than 4n groups pass (heavy ties), the flat ``torch.topk`` runs instead. Its time at
    the shape above: benchmarks/RESULTS.md, "The selections beside their alternatives".
    """
    R, C = scores.shape
    if not 1 <= n <= R * C:
        raise ValueError(f"n must be in [1, {R * C}], got {n}")
    fast = _grouped_global_topk(scores, n, group, sample_step, margin) if R * C >= fast_from else None
    if fast is not None:
        return fast
    top = scores.reshape(-1).topk(n, sorted=False)
    return top.indices // C, top.indices % C, top.values


def _grouped_global_topk(scores: Tensor, n: int, group: int, sample_step: int, margin: float):
    """`global_topk`'s steps 1-3, or None where its exactness condition fails."""
    R, C = scores.shape
    n1 = C // group
    m = math.ceil(margin * n / sample_step)
    if n1 == 0 or m > (R * n1) // sample_step:
        return None
    gm = strided_group_max(scores, group)  # [R, n1]
    t = gm.reshape(-1)[::sample_step].topk(m, sorted=False).values.min()
    keep = ~(gm < t)  # >= t, and NaN, which torch.topk ranks first (a NaN t keeps all: fallback)
    if not n <= int(keep.sum()) <= 4 * n:
        return None
    r, c = keep.nonzero(as_tuple=True)
    pos = ((r * C + c)[:, None] + n1 * torch.arange(group, device=scores.device)).flatten()
    if n1 * group < C:  # the columns outside the groups, in every row
        tail = torch.arange(n1 * group, C, device=scores.device)
        pos = torch.cat([pos, (torch.arange(R, device=scores.device)[:, None] * C + tail).flatten()])
    vals = scores.reshape(-1)[pos]
    above = (~(vals < t)).nonzero().flatten()
    top = vals[above].topk(n, sorted=False)
    pos = pos[above[top.indices]]
    return pos // C, pos % C, top.values


def column_topk(scores: Tensor, m: Tensor, *, group: int = 8, narrow_max: int = 32,
                fast_from: int = 1 << 20) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each column j of ``scores`` [R, C], its ``m[j]`` largest entries (1 <= m[j] <= R):
    (rows, cols, values) of all of them, and ``smallest`` [C], each column's m[j]-th value.
    Which of several equal values at a column's cut are kept is unspecified.

    Feature Choice keeps each latent's m_j largest activations over the batch; a column-wise
    ``torch.topk`` over [4096, 12288] takes several times as long as this (benchmarks/RESULTS.md,
    "The selections beside their alternatives"). Instead, for columns
    with m[j] <= ``narrow_max`` (matrices of at least ``fast_from`` entries): maxima over
    groups of ``group`` consecutive rows, [R // group, C]; per column, the M largest group
    maxima (M = the largest such m[j]); the column's top m[j] entries all lie in those M
    groups, unless the M-th and (M+1)-th group maxima tie (those columns go to the direct
    path, as do the wide ones); the top M of the M·group candidates are then exact. Rows
    past the last whole group are always candidates.
    """
    R, C = scores.shape
    if m.shape != (C,) or not bool(((m >= 1) & (m <= R)).all()):
        raise ValueError(f"m must be [{C}] with entries in [1, {R}]")
    dev = scores.device
    parts = []  # (columns, their top values [c, M] descending, their rows [c, M])
    B1 = R // group
    narrow = m <= narrow_max
    M = int(m[narrow].max()) if bool(narrow.any()) else 0
    direct = torch.ones(C, dtype=torch.bool, device=dev)
    if R * C >= fast_from and 0 < M < B1:
        cols = narrow.nonzero().flatten()
        gm = scores[: B1 * group].unflatten(0, (B1, group)).amax(1)  # [B1, C]
        gm = gm.t().contiguous() if len(cols) == C else gm.t()[cols]  # [c, B1]: rows are columns
        v, gid = gm.topk(M + 1, dim=1)  # [c, M + 1]
        exact = v[:, M - 1] != v[:, M]
        cols, gid = cols[exact], gid[exact, :M]
        cand = (gid[:, :, None] * group + torch.arange(group, device=dev)).flatten(1)  # [c, M*group] rows
        if B1 * group < R:
            cand = torch.cat([cand, torch.arange(B1 * group, R, device=dev).expand(len(cols), -1)], 1)
        tv, tp = scores.reshape(-1)[cand * C + cols[:, None]].topk(M, dim=1)
        parts.append((cols, tv, cand.gather(1, tp)))
        direct[cols] = False
    cols = direct.nonzero().flatten()
    if len(cols):
        tv, tr = scores[:, cols].topk(int(m[cols].max()), dim=0)  # [M', c]
        parts.append((cols, tv.t(), tr.t()))
    smallest = scores.new_empty(C)
    out = []
    for cols, tv, tr in parts:
        mc = m[cols]
        keep = torch.arange(tv.shape[1], device=dev) < mc[:, None]
        out.append((tr[keep], cols[:, None].expand_as(tr)[keep], tv[keep]))
        smallest[cols] = tv.gather(1, (mc - 1)[:, None])[:, 0]
    rows, cols, values = (torch.cat(t) for t in zip(*out))
    return rows, cols, values, smallest
