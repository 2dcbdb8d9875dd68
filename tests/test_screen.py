"""The bf16-screened TopK encoder (kernels/screen.py): its bound, its exactness, its fallbacks
and when impl="auto" takes it. tests/test_kernels.py also runs every encoder test with
impl="screen" on integer data, where it must match the dense reference exactly; Mutual and
Feature Choice's batch screens (kernels/screen_batch.py) are tests/test_screen_batch.py's."""

from __future__ import annotations

import logging

import pytest
import torch

from saekit.kernels import encode_topk, encode_topk_aux, resolve_impl
from saekit.kernels import screen
from tests.screen_helpers import EDGE, REAL, assert_errs_by_the_bound, flip_sae, randn_sae


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
    real = screen.strided_group_max
    monkeypatch.setattr(screen, "strided_group_max", lambda *a: seen.append(1) or real(*a))
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


# ---- adversarial data: bf16 rounding errs by the whole bound ------------------------------


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
    lead = 2 * REAL + EDGE[case]
    latents = [(0, +1, A_G - lead), (0, -1, A_G)] + [(0, 0, 0.875)] * (k - 1)
    latents += [(-1, 0, 0)] * (d_sae - len(latents))
    x, W_enc = flip_sae(latents, [(0, 1.0), (0, 2.0**40), (0, 2.0**-40)], 1)
    assert_errs_by_the_bound(x, W_enc, [(0, 0), (0, 1)], [+1, -1])
    b_enc, b_dec = torch.zeros(d_sae), torch.zeros(x.shape[1])
    got = encode_topk(x, W_enc, b_enc, b_dec, k, impl="screen")
    want = encode_topk(x, W_enc, b_enc, b_dec, k, impl="torch")
    assert want.indices[:, -1].tolist() == [1 if case == "outside" else 0] * 3
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


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
