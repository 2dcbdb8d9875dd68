"""Mutual and Feature Choice's batch-level selections on the bf16 screen
(kernels/screen_batch.py): the same selections as the fp32 path, giving up early where
nothing can be ruled out, and exact at the edge of the bound on adversarial data."""

from __future__ import annotations

import pytest
import torch

from saekit.kernels import screen_batch
from saekit.training.losses import encode_with_aux
from tests.screen_helpers import EDGE, REAL, assert_errs_by_the_bound, flip_sae, randn_sae


def test_batch_selections_give_up_early_where_nothing_can_be_ruled_out():
    """Equal pre-activations everywhere: Mutual and Feature Choice's screens return None (the
    fp32 path runs) without building every (token, latent) pair."""
    x, W_enc, _, b_dec = randn_sae(256, 32, 2048, seed=8)
    x, b_enc = b_dec.expand(256, -1).clone(), torch.full((2048,), 0.5)
    assert screen_batch.screened_global_topk(x - b_dec, W_enc, b_enc, 8 * 256) is None
    assert screen_batch.screened_column_topk(x - b_dec, W_enc, b_enc, torch.ones(2048, dtype=torch.long)) is None


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
    real_rescore = screen_batch.rescore
    monkeypatch.setattr(screen_batch, "rescore", lambda *a: rescored.append(len(a[3])) or real_rescore(*a))
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


@pytest.mark.parametrize("case", ["inside", "outside"])
def test_mutual_choice_screen_at_the_edge_of_its_bound(case):
    """The batch's top 1: token 0 (norm 16) leads token 1 (norm 8) in the bf16 product by
    E_0 + E_1 - ``EDGE[case]``, with errors -E_0 and +E_1: the window must hold the bound of
    the row behind the threshold plus that of the candidate's row. Six more tokens of norm
    16 keep token 0 from being an outlier."""
    A_G = 0.125
    latents = [(0, -1, A_G), (1, +1, 2 * A_G - 3 * REAL - EDGE[case])] + [(-1, 0, 0)] * 254
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
    A = -REAL - EDGE[case] / 2
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
