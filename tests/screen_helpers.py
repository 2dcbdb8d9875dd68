"""Data shared by tests/test_screen.py (the TopK screen) and tests/test_screen_batch.py
(Mutual and Feature Choice's batch screens): seeded random SAEs, and adversarial SAEs on
which bf16 rounding errs by the whole of the screen's bound."""

from __future__ import annotations

import torch

from saekit.kernels import screen


def randn_sae(B, d_in, d_sae, seed=0, w_scale=None):
    """Seeded random x [B, d_in], W_enc [d_in, d_sae], b_enc, b_dec; latent j's weights
    scaled by ``w_scale[j]`` where given."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g) * 3
    W_T = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
    if w_scale is not None:  # latents of very different norms
        W_T *= w_scale[:, None]
    b_enc = torch.randn(d_sae, generator=g) * 0.3
    b_dec = torch.randn(d_in, generator=g) * 0.1
    return x, W_T.t(), b_enc, b_dec  # W_enc [d_in, d_sae], stored as rows like saekit.SAE


# ---- adversarial data: bf16 rounding errs by the whole bound ------------------------------

DELTA = 15 * 2.0**-13  # below half a bf16 ulp of every entry flip_sae rounds (2^-9 for 0.5..2)
BLOCK = 64             # coordinates per block
REAL = BLOCK * DELTA   # |x.(w - bf16(w))| for a unit-sign row of its block: 0.1171875


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
    S = torch.randint(0, 2, (n_blocks, BLOCK), generator=g).float() * 2 - 1
    c = torch.ones(BLOCK)
    c[1::2] = -1
    W_T = (-S / 8).flatten().repeat(len(latents), 1)  # [d_sae, d_in]
    for j, (b, sigma, A) in enumerate(latents):
        if b >= 0:
            cj = c.clone()
            cj[0] += A
            W_T[j, b * BLOCK:(b + 1) * BLOCK] = S[b] * cj + sigma * DELTA * S[b]
    x = torch.zeros(len(rows), n_blocks * BLOCK)
    for i, (b, t) in enumerate(rows):
        x[i, b * BLOCK:(b + 1) * BLOCK] = t * S[b]
    return x, W_T.t()


def assert_errs_by_the_bound(x, W_enc, pairs, sign):
    """The construction's premise: on each (row, latent) pair the bf16 product errs (r - a)
    by more than 0.98 of the bound E of its row, with the given sign."""
    zero = torch.zeros(W_enc.shape[1])
    a, E = screen.screen_product(x, W_enc, zero)
    r = x.double() @ W_enc.double()
    for (i, j), s in zip(pairs, sign):
        err = float(r[i, j] - a[i, j].double())
        assert s * err > 0.98 * float(E[i]), (i, j, err, float(E[i]))


EDGE = {"inside": -2.0**-7, "tie": 0.0, "outside": 2.0**-7}  # how far the flipped latent is behind
