"""The bf16-screened TopK encoder (kernels/screen.py): its bound, its exactness, its fallbacks
and when impl="auto" takes it. tests/test_kernels.py also runs every encoder test with
impl="screen" on integer data, where it must match the dense reference exactly."""

from __future__ import annotations

import logging

import pytest
import torch

from saekit.kernels import encode_topk, encode_topk_aux, resolve_impl
from saekit.kernels import screen, screen_batch
from saekit.training.losses import encode_with_aux


def randn_sae(B, d_in, d_sae, seed=0, w_scale=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g) * 3
    W_T = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
    if w_scale is not None:  # latents of very different norms
        W_T *= w_scale[:, None]
    b_enc = torch.randn(d_sae, generator=g) * 0.3
    b_dec = torch.randn(d_in, generator=g) * 0.1
    return x, W_T.t(), b_enc, b_dec  # W_enc [d_in, d_sae], stored as rows like saekit.SAE


@pytest.mark.parametrize("scale", [1.0, 1e-12, 1e12, 1e-30])
def test_bound_holds_for_every_latent(scale):
    """|s - a| <= E + u'|a| for the exact (float64) pre-activation s and the bf16 matmul a,
    over every entry, with weights whose norms span four orders of magnitude. At 1e-30 the
    fp32 squares underflow and the bound keeps a floor (~1e-16) far above the data: still a
    bound, but every latent is then a candidate and the rows take the fp32 product."""
    w_scale = torch.logspace(-2, 2, 1536)
    x, W_enc, b_enc, b_dec = randn_sae(64, 96, 1536, w_scale=w_scale)
    x, b_enc, b_dec = x * scale, b_enc * scale, b_dec * scale
    xc = x - b_dec
    Wa = torch.zeros(1536, screen._padded_k(96), dtype=torch.bfloat16)
    xa = torch.zeros(64, Wa.shape[1], dtype=torch.bfloat16)
    E = screen._row_bounds(xc, xa, screen._column_bounds(W_enc.t(), b_enc, Wa))
    a = (xa @ Wa.t()).double()
    s = xc.double() @ W_enc.double() + b_enc.double()
    slack = E.double()[:, None] + screen._U_OUT * a.abs() - (s - a).abs()
    assert bool((slack >= 0).all())
    if scale > 1e-15:  # and it is not vacuous
        assert bool((E.double()[:, None] < 0.05 * s.abs().amax(1, keepdim=True)).all())


@pytest.mark.parametrize("B,d_in,d_sae,k,grouped,negative", [
    (300, 64, 2048, 8, True, False),    # strided groups of 8
    (300, 64, 2048, 8, True, True),     # ... where many rows' top k are negative
    (257, 40, 1003, 4, True, False),    # groups, and 3 columns in no group
    (257, 40, 1003, 16, False, False),  # too few groups for k: whole rows
    (64, 32, 600, 1, True, True),
])
def test_screen_selects_the_fp32_top_k(B, d_in, d_sae, k, grouped, negative, monkeypatch):
    """Random data: the same values as the fp32 path (within fp32 rounding) and the same
    latents on every row whose k-th and (k+1)-th pre-activations are not within 1e-5 of each
    other, which are also the top k of the float64 pre-activations. ``negative``: a bias of
    -40 puts the top k of every other row below 0 (the rest are scaled up to stay above),
    so both ways of comparing group maxima with the threshold run."""
    seen = []
    real = screen._strided_group_max
    monkeypatch.setattr(screen, "_strided_group_max", lambda *a: seen.append(1) or real(*a))
    x, W_enc, b_enc, b_dec = randn_sae(B, d_in, d_sae, seed=k)
    if negative:
        b_enc = b_enc - 40
        x[::2] *= 10
    got = encode_topk(x, W_enc, b_enc, b_dec, k, impl="screen")
    want = encode_topk(x, W_enc, b_enc, b_dec, k, impl="torch")
    torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5)
    s = (x - b_dec).double() @ W_enc.double() + b_enc.double()
    top = s.topk(k + 1, dim=1).values
    clear = (top[:, k - 1] - top[:, k]) > 1e-5 * top[:, k - 1].abs().clamp(min=1)
    assert clear.float().mean() > 0.9
    assert torch.equal(got.indices.sort(1).values[clear], want.indices.sort(1).values[clear])
    assert torch.equal(got.indices[clear].sort(1).values, s[clear].topk(k, dim=1).indices.sort(1).values)
    assert len(seen) == (0 if not grouped else 2 if negative else 1)  # bit maxima, then value maxima
    if negative:
        assert (want.values == 0).any() and (want.values > 0).any()


def test_screen_backward_and_aux_match_the_fp32_path():
    x, W_enc, b_enc, b_dec = randn_sae(300, 64, 2048, seed=5)
    dead = torch.zeros(2048, dtype=torch.bool)
    dead[::3] = True
    grads = {}
    for impl in ("screen", "torch"):
        lv = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
        top, aux = encode_topk_aux(*lv, 8, dead, 32, impl=impl)
        (top.values.square().sum() + aux.values.sum()).backward()
        grads[impl] = (top, aux, [t.grad for t in lv])
    (t1, a1, g1), (t2, a2, g2) = grads["screen"], grads["torch"]
    assert torch.equal(t1.indices, t2.indices) and torch.equal(a1.indices, a2.indices)
    torch.testing.assert_close(a1.values, a2.values, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fallbacks_give_the_fp32_result(caplog, monkeypatch):
    monkeypatch.setattr(screen, "_logged", set())
    x, W_enc, b_enc, b_dec = randn_sae(40, 32, 1024, seed=1)
    # Latents that differ by far less than bf16 can see: every latent is a candidate.
    near = (W_enc[:, :1] + 1e-6 * W_enc).contiguous()
    cases = [(x, near, torch.zeros_like(b_enc)),
             (x.clone().index_fill_(0, torch.tensor([3]), float("nan")), W_enc, b_enc)]
    with caplog.at_level(logging.INFO, logger="saekit.kernels"):
        for xs, W, b in cases:
            got = encode_topk(xs, W, b, b_dec, 4, impl="screen")
            want = encode_topk(xs, W, b, b_dec, 4, impl="torch")
            assert torch.equal(got.indices, want.indices)
            torch.testing.assert_close(got.values, want.values, equal_nan=True)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "every row has more than 16·k candidates" in said and "non-finite" in said


def test_batch_selections_give_up_early_where_nothing_can_be_ruled_out():
    """Equal pre-activations everywhere: Mutual and Feature Choice's screens return None (the
    fp32 path runs) without building every (token, latent) pair."""
    x, W_enc, _, b_dec = randn_sae(256, 32, 2048, seed=8)
    x, b_enc = b_dec.expand(256, -1).clone(), torch.full((2048,), 0.5)
    assert screen_batch.screened_global_topk(x - b_dec, W_enc, b_enc, 8 * 256) is None
    assert screen_batch.screened_column_topk(x - b_dec, W_enc, b_enc, torch.ones(2048, dtype=torch.long)) is None


def test_rows_the_bound_cannot_narrow_take_the_fp32_product(caplog, monkeypatch):
    """A row with x = b_dec and b_enc = 0 (a common start) ties every latent at 0."""
    monkeypatch.setattr(screen, "_logged", set())
    x, W_enc, _, b_dec = randn_sae(300, 64, 2048, seed=4)
    b_enc = torch.zeros(2048)
    x[7] = b_dec
    with caplog.at_level(logging.INFO, logger="saekit.kernels"):
        got = encode_topk(x, W_enc, b_enc, b_dec, 8, impl="screen")
    want = encode_topk(x, W_enc, b_enc, b_dec, 8, impl="torch")
    assert torch.equal(got.indices[7], torch.arange(8)) and torch.equal(got.values[7], torch.zeros(8))
    torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5)
    assert "rows with more than 16·k candidates" in " ".join(r.getMessage() for r in caplog.records)


def test_hard_cases_from_review():
    """Each of these once gave a wrong top-k."""
    # bf16 buffers reused by a call whose d_in pads to the same width: stale padding columns
    g = torch.Generator().manual_seed(0)
    big = [torch.randn(32, 24, generator=g) * 30, torch.randn(24, 512, generator=g) * 30, torch.zeros(512),
           torch.zeros(24)]
    small = [torch.randn(32, 20, generator=g), torch.randn(20, 512, generator=g), torch.zeros(512), torch.zeros(20)]
    encode_topk(*big, 4, impl="screen")
    assert torch.equal(encode_topk(*small, 4, impl="screen").indices, encode_topk(*small, 4, impl="torch").indices)
    # a product that rounds to +inf in bf16 while it is finite in fp32
    x = torch.tensor([[(1 + 2**-8 + 2**-20) * 2.0**63], [1.0]])
    W = torch.tensor([[(1 + 125 / 128 + 2**-8 + 2**-20) * 2.0**63, 1.0, 2.0]])
    b = torch.tensor([2.0**127, 0.0, 0.0])
    for rows in (slice(None), slice(0, 1)):
        got, want = (encode_topk(x[rows], W, b, torch.zeros(1), 1, impl=i) for i in ("screen", "torch"))
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    # norms whose fp32 sums of squares underflow: the bound must not collapse to 0
    x = torch.tensor([[1 + 0.6 * 2**-8, 1.0]]) * 2.0**-83
    W = torch.tensor([[2.0**-9, 1.0], [0.0, -1.0]])
    assert encode_topk(x, W, torch.zeros(2), torch.zeros(2), 1, impl="screen").indices.tolist() == [[1]]


def test_screen_under_inference_mode():
    x, W_enc, b_enc, b_dec = randn_sae(300, 64, 2048, seed=2)
    screen._tls.__dict__.clear()  # the first call makes the buffers, inside inference mode
    with torch.inference_mode():
        a = encode_topk(x, W_enc, b_enc, b_dec, 8, impl="screen")
    b = encode_topk(x, W_enc, b_enc, b_dec, 8, impl="screen")
    assert torch.equal(a.indices, b.indices)


def test_auto_takes_the_screen_only_where_it_pays(monkeypatch):
    calls = []
    real = screen.screened_select
    monkeypatch.setattr(screen, "screened_select", lambda *a: calls.append(1) or real(*a))
    x, W_enc, b_enc, b_dec = randn_sae(1024, 256, 4096, seed=3)
    for amx, expect in ((False, 0), (True, 1)):
        monkeypatch.setattr(screen, "amx_available", lambda: amx)
        calls.clear()
        encode_topk(x, W_enc, b_enc, b_dec, 32, impl="auto")
        assert len(calls) == expect
    calls.clear()
    encode_topk(x[:512], W_enc, b_enc, b_dec, 32, impl="auto")   # batch too small
    encode_topk(x, W_enc, b_enc, b_dec, 64, impl="auto")         # d_sae < 128 k
    encode_topk(x.bfloat16(), W_enc.bfloat16(), b_enc.bfloat16(), b_dec.bfloat16(), 32, impl="auto")
    encode_topk(x, W_enc, b_enc, b_dec, 32, impl="torch")
    assert calls == []
    with pytest.raises(ValueError, match="CPU path"):
        resolve_impl("screen", "cuda")


def pairs(codes):
    """The (token, latent) pairs of ragged codes, sorted."""
    real = torch.arange(codes.indices.shape[1]) < codes.lengths[:, None]
    rows = torch.arange(len(codes.indices))[:, None].expand_as(codes.indices)[real]
    return sorted(zip(rows.tolist(), codes.indices[real].tolist()))


@pytest.mark.parametrize("negative,outlier", [(False, False), (True, False), (False, True)])
def test_mutual_choice_on_the_screen_keeps_the_fp32_selection(negative, outlier, monkeypatch):
    """Mutual Choice's batch-wide top k·B through the screen: the same (token, latent) pairs
    as the fp32 path wherever the n-th and (n+1)-th pre-activations of the batch are apart,
    the same values, and the same AuxK selection (made from the eligible columns only)."""
    from saekit.sae import SAE, SAEConfig

    made, rescored = [], []
    real = screen_batch.screened_global_topk
    monkeypatch.setattr(screen_batch, "screened_global_topk", lambda *a: made.append(real(*a)) or made[-1])
    real_rescore = screen_batch._rescore
    monkeypatch.setattr(screen_batch, "_rescore", lambda *a: rescored.append(len(a[3])) or real_rescore(*a))
    x, W_enc, b_enc, b_dec = randn_sae(300, 64, 2048, seed=6)
    if negative:  # the batch's top k·B below zero: rows with tau <= 0
        b_enc = b_enc - 12
    if outlier:  # one token of 30x the norm: computed exactly, the others keep a tight bound
        x[5] *= 30
    out = {}
    for impl in ("screen", "torch"):
        sae = SAE(SAEConfig(d_in=64, d_sae=2048, k=8, sparsity="mutual_choice", impl=impl), seed=0)
        with torch.no_grad():
            sae.W_enc_T.copy_(W_enc.t())
            sae.b_enc.copy_(b_enc)
            sae.b_dec.copy_(b_dec)
        dead = torch.zeros(2048)
        dead[::5] = 1
        enc = encode_with_aux(sae, x, None, dead, 16)
        out[impl] = enc, sae.sparsifier.theta.clone()
    (a, theta_a), (b, theta_b) = out["screen"], out["torch"]
    assert len(made) == 1 and made[0] is not None  # the screen ran (impl="torch" never calls it)
    if outlier:  # its row joins whole; the others' candidates stay ~1.5 n (~18 n with its bound)
        assert (made[0][0] == 5).sum() > 8 and rescored[0] < 3 * 8 * 300
    s = ((x - b_dec).double() @ W_enc.double() + b_enc.double()).flatten().sort(descending=True).values
    n = 8 * 300
    assert (s[n - 1] - s[n]) > 1e-5 * s[n - 1].abs()  # this seed's cut is clear of rounding
    assert pairs(a.codes) == pairs(b.codes) and torch.equal(a.codes.lengths, b.codes.lengths)
    torch.testing.assert_close(a.codes.values.sort(1).values, b.codes.values.sort(1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theta_a, theta_b, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.aux.indices, b.aux.indices)
    torch.testing.assert_close(a.aux.values, b.aux.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity,B,outlier", [("uniform", 320, False), ("zipf", 320, False),
                                                ("uniform", 325, False), ("uniform", 320, True)])
def test_feature_choice_on_the_screen_keeps_the_fp32_selection(capacity, B, outlier, monkeypatch):
    """Feature Choice's per-latent top m_j through the screen: the same (token, latent) pairs
    as the fp32 path on every latent whose m_j-th and (m_j+1)-th pre-activations are apart,
    the same values and per-latent smallest kept values. zipf gives the first latents
    capacities above a quarter of the token groups (their fp32 columns); B=325 leaves 5
    tokens in no group; ``outlier`` one token of 30x the norm (computed exactly)."""
    from saekit.sae import SAE
    from saekit.types import SAEConfig, VariantOptions

    made = []
    real = screen_batch.screened_column_topk
    monkeypatch.setattr(screen_batch, "screened_column_topk", lambda *a: made.append(real(*a)) or made[-1])
    x, W_enc, b_enc, b_dec = randn_sae(B, 64, 2048, seed=7)
    if outlier:
        x[9] *= 30
    out = {}
    for impl in ("screen", "torch"):
        cfg = SAEConfig(d_in=64, d_sae=2048, k=8, sparsity="feature_choice", impl=impl,
                        variant=VariantOptions(capacity=capacity, zipf_s=1.0))
        sae = SAE(cfg, seed=0)
        with torch.no_grad():
            sae.W_enc_T.copy_(W_enc.t())
            sae.b_enc.copy_(b_enc)
            sae.b_dec.copy_(b_dec)
        out[impl] = encode_with_aux(sae, x).codes, sae.sparsifier.theta.clone(), sae.sparsifier.capacities(B)
    (a, theta_a, m), (b, theta_b, _) = out["screen"], out["torch"]
    assert len(made) == 1 and made[0] is not None
    if capacity == "zipf":
        assert int(m.max()) > (B // 8) // 4
    s = ((x - b_dec).double() @ W_enc.double() + b_enc.double()).sort(0, descending=True).values  # [B, d_sae]
    cut, nxt = s.gather(0, (m - 1)[None])[0], s.gather(0, m.clamp(max=B - 1)[None])[0]
    clear = ((cut - nxt) > 1e-5 * cut.abs()) | (m == B)
    assert clear.float().mean() > 0.99
    keep = lambda c: [p for p in pairs(c) if clear[p[1]]]  # noqa: E731
    assert keep(a) == keep(b)
    torch.testing.assert_close(theta_a, theta_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.values.sum(), b.values.sum(), rtol=1e-5, atol=1e-3)


# ---- adversarial data: bf16 rounding errs by the whole bound ------------------------------

_DELTA = 15 * 2.0**-13  # below half a bf16 ulp of every entry flip_sae rounds (2^-9 for 0.5..2)
_M = 64                 # coordinates per block
_REAL = _M * _DELTA     # |x.(w - bf16(w))| for a unit-sign row of its block: 0.1171875


def flip_sae(latents, rows, n_blocks, seed=0):
    """x [len(rows), 64 n_blocks], W_enc [d_in, len(latents)]: bf16 rounding errs on chosen
    (token, latent) pairs by the whole of the bound's |x| Dw term, in a chosen direction.

    Block b holds a sign pattern s_b in {-1, 1}^64. A row ``(b, t)`` is ``t s_b`` on block b and 0
    elsewhere (bf16-exact). A latent ``(b, sigma, A)`` is ``s_b * c + sigma DELTA s_b`` on block
    b, with c = (1 + A, -1, 1, -1, ...), which bf16 rounds to ``s_b * c`` exactly, and ``-s/8``
    on the other blocks; b = -1: ``-s/8`` everywhere. For a row and a latent of one block the
    bf16 product is ``a = t A`` exactly while the fp32 one is ``r = t (A + sigma 64 DELTA)``:
    the error x.(w - bf16(w)) equals |x| |w - bf16(w)| = |x| Dw (Cauchy-Schwarz with equality;
    every latent has |w - bf16(w)| = Dw or 0). Across blocks a = r = -8t. Every sum is exact
    in fp32 and every a exact in bf16, so only the bound's own slack (~1%) is left."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randint(0, 2, (n_blocks, _M), generator=g).float() * 2 - 1
    c = torch.ones(_M)
    c[1::2] = -1
    W_T = (-S / 8).flatten().repeat(len(latents), 1)  # [d_sae, d_in]
    for j, (b, sigma, A) in enumerate(latents):
        if b >= 0:
            cj = c.clone()
            cj[0] += A
            W_T[j, b * _M:(b + 1) * _M] = S[b] * cj + sigma * _DELTA * S[b]
    x = torch.zeros(len(rows), n_blocks * _M)
    for i, (b, t) in enumerate(rows):
        x[i, b * _M:(b + 1) * _M] = t * S[b]
    return x, W_T.t()


def assert_errs_by_the_bound(x, W_enc, pairs, sign):
    """The construction's premise: on each (row, latent) pair the bf16 product errs (r - a)
    by more than 0.98 of the bound E of its row, with the given sign."""
    zero = torch.zeros(W_enc.shape[1])
    a, E = screen._screen_product(x, W_enc, zero)
    r = x.double() @ W_enc.double()
    for (i, j), s in zip(pairs, sign):
        err = float(r[i, j] - a[i, j].double())
        assert s * err > 0.98 * float(E[i]), (i, j, err, float(E[i]))


EDGE = {"inside": -2.0**-7, "tie": 0.0, "outside": 2.0**-7}  # how far the flipped latent is behind


@pytest.mark.parametrize("case", list(EDGE))
@pytest.mark.parametrize("d_sae,k,A_G", [(256, 3, 0.125), (256, 1, 0.125), (40, 1, 0.125), (40, 2, -0.125)])
def test_topk_screen_at_the_edge_of_its_bound(case, d_sae, k, A_G):
    """Latent 1 leads latent 0 in the bf16 product by 2·E - ``EDGE[case]``, with rounding
    errors of -E on it and +E on latent 0: in fp32 latent 0 comes out ahead ("inside"), ties
    it (and wins: the lower index) or stays one bf16 step behind ("outside"). A bound even
    ~2% too small leaves latent 0 out of the candidates. k - 1 latents far above take the
    other places. Rows of norms 8, 8·2^40 and 8·2^-40: the bound scales with them.
    d_sae=256 ranks strided groups, 40 whole rows. A negative k-th value (A_G < 0) only on
    whole rows: over groups its threshold comes from the bit maxima of negative groups,
    sound but loose (the most negative member), which no bound error could show."""
    lead = 2 * _REAL + EDGE[case]
    latents = [(0, +1, A_G - lead), (0, -1, A_G)] + [(0, 0, 0.875)] * (k - 1)
    latents += [(-1, 0, 0)] * (d_sae - len(latents))
    x, W_enc = flip_sae(latents, [(0, 1.0), (0, 2.0**40), (0, 2.0**-40)], 1)
    assert_errs_by_the_bound(x, W_enc, [(0, 0), (0, 1)], [+1, -1])
    b_enc, b_dec = torch.zeros(d_sae), torch.zeros(x.shape[1])
    got = encode_topk(x, W_enc, b_enc, b_dec, k, impl="screen")
    want = encode_topk(x, W_enc, b_enc, b_dec, k, impl="torch")
    assert want.indices[:, -1].tolist() == [1 if case == "outside" else 0] * 3
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


@pytest.mark.parametrize("case", ["inside", "outside"])
def test_mutual_choice_screen_at_the_edge_of_its_bound(case):
    """The batch's top 1: token 0 (norm 16) leads token 1 (norm 8) in the bf16 product by
    E_0 + E_1 - ``EDGE[case]``, with errors -E_0 and +E_1: the window must hold the bound of
    the row behind the threshold plus that of the candidate's row. Six more tokens of norm
    16 keep token 0 from being an outlier."""
    A_G = 0.125
    latents = [(0, -1, A_G), (1, +1, 2 * A_G - 3 * _REAL - EDGE[case])] + [(-1, 0, 0)] * 254
    rows = [(0, 2.0), (1, 1.0)] + [(2, 2.0)] * 6
    x, W_enc = flip_sae(latents, rows, 3)
    assert_errs_by_the_bound(x, W_enc, [(0, 0), (1, 1)], [-1, +1])
    b_enc = torch.zeros(256)
    got = screen_batch.screened_global_topk(x, W_enc, b_enc, 1)
    assert got is not None
    want = (1, 1) if case == "inside" else (0, 0)
    assert (int(got[0][0]), int(got[1][0])) == want
    from saekit.kernels.select import global_topk

    ref = global_topk(x @ W_enc, 1)
    assert (int(ref[0][0]), int(ref[1][0])) == want and torch.equal(got[2], ref[2])


@pytest.mark.parametrize("case", ["inside", "outside"])
def test_feature_choice_screen_at_the_edge_of_its_bound(case):
    """Latent 0 keeps its top token (m = 1) of 32: token 8 leads token 0 in the bf16 product
    by 2 E - ``EDGE[case]``, with errors -E and +E (tokens 0 and 8 are +s and -s on block 0;
    the others sit on block 1, far below): the per-latent window must be 2 E."""
    A = -_REAL - EDGE[case] / 2
    latents = [(0, +1, A)] + [(-1, 0, 0)] * 255
    rows = [(1, 1.0)] * 32
    rows[0], rows[8] = (0, 1.0), (0, -1.0)
    x, W_enc = flip_sae(latents, rows, 2)
    assert_errs_by_the_bound(x, W_enc, [(0, 0), (8, 0)], [+1, -1])
    m = torch.ones(256, dtype=torch.long)
    got = screen_batch.screened_column_topk(x, W_enc, torch.zeros(256), m)
    assert got is not None
    rows_got, cols_got, values_got, smallest = got
    want = 0 if case == "inside" else 8
    assert rows_got[cols_got == 0].tolist() == [want]
    from saekit.kernels.select import column_topk

    ref = column_topk(x @ W_enc, m)
    assert ref[0][ref[1] == 0].tolist() == [want]
    assert torch.equal(values_got[cols_got == 0], ref[2][ref[1] == 0]) and smallest[0] == ref[3][0]


# ---- the platform's bf16 matmul must accumulate as the bound assumes ------------------------


def test_this_platforms_bf16_matmul_accumulates_within_the_bound():
    """The probe behind impl="screen" (uncached here): on this machine the bf16 product
    stays within the bound, which assumes fp32 accumulation (PyTorch does not promise it)."""
    assert screen.bf16_accumulates_in_fp32.__wrapped__()


@pytest.mark.parametrize("chunk", [1, 64, 256])
def test_the_probe_catches_a_matmul_that_rounds_its_partial_sums_to_bf16(chunk, monkeypatch):
    """A matmul that accumulates fp32 over chunks of the inner dimension but keeps its
    running sum in bf16 between them (chunk 1: plain bf16 accumulation) fails the probe."""
    def rounding_mm(a, b, out):
        acc = torch.zeros(a.shape[0], b.shape[1])
        for k0 in range(0, a.shape[1], chunk):
            acc = (acc + a[:, k0:k0 + chunk].float() @ b[k0:k0 + chunk].float()).bfloat16().float()
        return out.copy_(acc)

    monkeypatch.setattr(screen, "_bf16_mm", rounding_mm)
    assert not screen.bf16_accumulates_in_fp32.__wrapped__()


def test_a_platform_failing_the_probe_refuses_screen_and_auto_falls_back(monkeypatch, caplog, capsys):
    """Where the probe fails, impl="screen" is refused in one line (at the trainer's start
    too) and impl="auto" takes the fp32 path where it would have screened, logged."""
    from saekit.errors import ConfigError
    from saekit.kernels import dispatch, encoder
    from saekit.sae import SAE, SAEConfig
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import Trainer

    monkeypatch.setattr(screen, "bf16_accumulates_in_fp32", lambda: False)
    monkeypatch.setattr(screen, "amx_available", lambda: True)
    monkeypatch.setattr(dispatch, "_logged", set())
    calls = []
    real = screen.screened_select
    monkeypatch.setattr(screen, "screened_select", lambda *a: calls.append(1) or real(*a))
    x, W_enc, b_enc, b_dec = randn_sae(1024, 256, 4096, seed=3)
    with pytest.raises(ValueError, match="impl='screen' needs a bf16 matmul that accumulates in fp32") as e:
        encode_topk(x, W_enc, b_enc, b_dec, 32, impl="screen")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="impl='screen' needs a bf16 matmul"):
        Trainer(SAE(SAEConfig(d_in=8, d_sae=64, k=4, impl="screen"), seed=0), TrainConfig(), total_steps=1)
    with caplog.at_level(logging.INFO, logger="saekit.kernels"):
        got = encode_topk(x, W_enc, b_enc, b_dec, 32, impl="auto")
    assert calls == [] and encoder.encoder_impl("auto", x, W_enc, 32) == "torch"
    want = encode_topk(x, W_enc, b_enc, b_dec, 32, impl="torch")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    assert "fails the fp32-accumulation probe" in " ".join(r.getMessage() for r in caplog.records)
    assert capsys.readouterr() == ("", "")  # logged, not printed
    monkeypatch.setattr(screen, "bf16_accumulates_in_fp32", lambda: True)  # the other branch
    assert encoder.encoder_impl("auto", x, W_enc, 32) == "screen"
    encode_topk(x, W_enc, b_enc, b_dec, 32, impl="screen")
    Trainer(SAE(SAEConfig(d_in=8, d_sae=64, k=4, impl="screen"), seed=0), TrainConfig(), total_steps=1)
    assert len(calls) == 1
