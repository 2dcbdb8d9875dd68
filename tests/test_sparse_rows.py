"""saekit.kernels' decoder and sparse-row kernels (kernels/sparse_rows.py): decode_sparse and
encode_selected, with and without ragged (padded) codes, against the dense maths, forward and
backward; the row-scatter's cached sort; the Triton row kernels directly (in Triton's CPU
interpreter, which tests/conftest.py switches on). Data and reference: tests/kernel_helpers.py.
"""

from __future__ import annotations

import pytest
import torch

from saekit.kernels import decode_sparse
from tests.kernel_helpers import (IMPLS, assert_grads_equal, dense_pre, gen, int_sae, leaves, on_test_device,
                                  scatter_dense, triton_case)

pytestmark = pytest.mark.usefixtures(on_test_device.__name__)


# ---- decoder --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_decode_sparse_matches_dense(impl, with_bias):
    d_sae, d_in, B, k = 333, 40, 37, 9
    g = gen(5)
    W_dec = torch.randint(-3, 4, (d_sae, d_in), generator=g).float().requires_grad_()
    b_dec = torch.randint(-3, 4, (d_in,), generator=g).float().requires_grad_() if with_bias else None
    values = torch.randint(-3, 4, (B, k), generator=g).float().requires_grad_()
    indices = torch.randint(0, d_sae, (B, k), generator=g)  # duplicates in a row are allowed
    up = torch.randint(-3, 4, (B, d_in), generator=g).float()
    out = decode_sparse(values, indices, W_dec, b_dec, impl=impl)
    (out * up).sum().backward()

    Wd, v = W_dec.detach().clone().requires_grad_(), values.detach().clone().requires_grad_()
    bd = b_dec.detach().clone().requires_grad_() if with_bias else None
    ref = scatter_dense(v, indices, d_sae) @ Wd + (bd if with_bias else 0)
    (ref * up).sum().backward()
    assert torch.equal(out, ref.detach())
    assert torch.equal(values.grad, v.grad) and torch.equal(W_dec.grad, Wd.grad)
    if with_bias:
        assert torch.equal(b_dec.grad, bd.grad)


def ragged_codes(B, K, d_sae, g):
    """Rows with 0..K real entries (integer values), then padding: value 0, any index."""
    lengths = torch.randint(0, K + 1, (B,), generator=g)
    lengths[:2] = torch.tensor([0, K])
    real = torch.arange(K) < lengths[:, None]
    values = torch.randint(1, 4, (B, K), generator=g).float() * real
    indices = torch.randint(0, d_sae, (B, K), generator=g)
    return values, indices, lengths, real


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_decode_skips_padding(impl):
    """With lengths, decoding equals the dense maths over the real entries, and the padding's
    values get zero gradient (without lengths they would get go . W_dec[index])."""
    d_sae, d_in, B, K = 333, 40, 37, 9
    g = gen(11)
    values, indices, lengths, real = ragged_codes(B, K, d_sae, g)
    W_dec = torch.randint(-3, 4, (d_sae, d_in), generator=g).float().requires_grad_()
    b_dec = torch.randint(-3, 4, (d_in,), generator=g).float().requires_grad_()
    up = torch.randint(-3, 4, (B, d_in), generator=g).float()
    v = values.clone().requires_grad_()
    out = decode_sparse(v, indices, W_dec, b_dec, impl=impl, lengths=lengths)
    (out * up).sum().backward()

    Wd, bd, v_ref = (t.detach().clone().requires_grad_() for t in (W_dec, b_dec, values))
    ref = scatter_dense(v_ref, indices, d_sae) @ Wd + bd
    (ref * up).sum().backward()
    assert torch.equal(out, ref.detach())
    assert torch.equal(W_dec.grad, Wd.grad) and torch.equal(b_dec.grad, bd.grad)
    assert torch.equal(v.grad, v_ref.grad * real) and (v.grad[~real] == 0).all()
    assert bool((v_ref.grad[~real] != 0).any())  # the padding would have had a gradient
    for bad in (lengths.int(), lengths + (torch.arange(B) == 1), lengths - 1):  # row 1 has K, row 0 has 0
        with pytest.raises(ValueError, match="lengths"):  # wrong dtype, > K, < 0
            decode_sparse(v, indices, W_dec, b_dec, impl=impl, lengths=bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_encode_selected_matches_padded(impl):
    from saekit.kernels import encode_selected

    d_in, d_sae, B, K = 24, 200, 37, 9
    g = gen(12)
    x, W_enc, b_enc, b_dec, _ = int_sae(d_in, d_sae, B)
    _, indices, lengths, real = ragged_codes(B, K, d_sae, g)
    values = dense_pre(x, W_enc, b_enc, b_dec).relu().gather(1, indices) * real
    up = torch.randint(-3, 4, (B, K), generator=g).float()
    grads = []
    for lens in (lengths, None):
        ts = leaves(x, W_enc, b_enc, b_dec)
        out = encode_selected(*ts, values, indices, impl=impl, lengths=lens)
        (out * up).sum().backward()
        grads.append([t.grad for t in ts])
    assert_grads_equal(grads[0], grads[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_sparse_bf16(impl):
    """bf16 in, fp32 accumulation, bf16 out: within 1 bf16 ulp (2**-8 relative) of fp32 maths."""
    g = gen(6)
    W_dec = torch.randn(200, 24, generator=g).bfloat16()
    values = torch.rand(37, 5, generator=g).bfloat16()
    indices = torch.stack([torch.randperm(200, generator=g)[:5] for _ in range(37)])
    out = decode_sparse(values, indices, W_dec, None, impl=impl)
    ref = scatter_dense(values.float(), indices, 200) @ W_dec.float()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2**-8, atol=1e-6)


def test_scatter_rows_reuses_its_sort_only_for_the_same_unmodified_indices():
    from saekit.kernels.sparse_rows import scatter_rows_torch

    g = gen(8)
    idx = torch.randint(0, 50, (20, 5), generator=g)
    w, dense = torch.randn(20, 5, generator=g), torch.randn(20, 3, generator=g)

    def naive(i):
        return torch.zeros(50, 3).index_add_(0, i.reshape(-1), (w[..., None] * dense[:, None]).reshape(-1, 3))

    torch.testing.assert_close(scatter_rows_torch(idx, w, dense, 50), naive(idx))
    torch.testing.assert_close(scatter_rows_torch(idx.view(20, 5), w, dense, 50), naive(idx))  # cached
    idx[3, 1] = (idx[3, 1] + 1) % 50  # in place: the version counter moves, the sort is redone
    torch.testing.assert_close(scatter_rows_torch(idx, w, dense, 50), naive(idx))
    other = torch.randint(0, 50, (20, 5), generator=g)
    torch.testing.assert_close(scatter_rows_torch(other, w, dense, 50), naive(other))


# ---- the Triton pieces directly ----------------------------------------------------------------------------


@triton_case
def test_triton_sparse_row_kernels_strided_and_empty():
    from saekit.kernels import sparse_rows as sr
    from saekit.kernels.sparse_rows_triton import gather_rows_triton, row_dot_triton, scatter_rows_triton

    g = gen(7)
    idx = torch.randint(0, 333, (37, 11), generator=g)
    w = torch.randint(-3, 4, (37, 11), generator=g).float()
    M = torch.randint(-3, 4, (40, 333), generator=g).float().t()  # strided [333, 40], like W_enc.t()
    dense = torch.randint(-3, 4, (37, 40), generator=g).float()
    assert torch.equal(gather_rows_triton(idx, w, M), sr.gather_rows_torch(idx, w, M))
    assert torch.equal(row_dot_triton(idx, dense, M), sr.row_dot_torch(idx, dense, M))
    assert torch.equal(scatter_rows_triton(idx, w, dense, 333), sr.scatter_rows_torch(idx, w, dense, 333))
    e = idx[:, :0]
    assert gather_rows_triton(e, w[:, :0], M).abs().sum() == 0
    assert row_dot_triton(e, dense, M).shape == (37, 0)
    assert scatter_rows_triton(e, w[:, :0], dense, 333).abs().sum() == 0
