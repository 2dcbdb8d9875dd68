"""The kernels' public operations against their plain specification, kernels/reference.py:
the same selections (index for index where the tie rule fixes them, as sets where it does not)
and, through autograd, the same gradients, on every CPU path (torch, and the bf16 screen)."""

import pytest
import torch

from saekit import kernels
from saekit.kernels import reference as ref

IMPLS = ["torch", "screen"]


def weights(B=96, d_in=32, d_sae=1024, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # small integers: exact sums with many equal values
        x = torch.randint(-2, 3, (B, d_in), generator=g).float()
        W_enc = torch.randint(-1, 2, (d_in, d_sae), generator=g).float()
        return x, W_enc, torch.zeros(d_sae), torch.zeros(d_in)
    x = torch.randn(B, d_in, generator=g)
    W_enc = torch.randn(d_sae, d_in, generator=g).t() / d_in ** 0.5  # stored as rows, as saekit.SAE does
    return x, W_enc, torch.randn(d_sae, generator=g) * 0.1, torch.randn(d_in, generator=g) * 0.1


def leaves(*ts):
    return [t.clone().requires_grad_(True) for t in ts]


def grads(ts):
    return [t.grad for t in ts]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ties", [False, True])
def test_encode_topk_is_the_reference(impl, ties):
    x, W_enc, b_enc, b_dec = weights(ties=ties)
    up = torch.randn(96, 16)
    got_in, want_in = leaves(x, W_enc, b_enc, b_dec), leaves(x, W_enc, b_enc, b_dec)
    got = kernels.encode_topk(*got_in, 16, impl=impl)
    want = ref.encode_topk(*want_in, 16)
    assert torch.equal(got.indices, want[1])
    torch.testing.assert_close(got.values, want[0], rtol=1e-5, atol=1e-5)
    (got.values * up).sum().backward()
    (want[0] * up).sum().backward()
    for a, b in zip(grads(got_in), grads(want_in)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_selections_are_the_reference(impl):
    x, W_enc, b_enc, b_dec = weights(B=256, d_sae=2048)
    pre = kernels.PreActivations(x, W_enc, b_enc, b_dec, impl, 8)
    dense = ref.pre_activations(x, W_enc, b_enc, b_dec)

    def pairs(rows, cols):
        return set(zip(rows.tolist(), cols.tolist()))

    rows, cols, values = pre.global_topk(8 * 256)
    want = ref.global_topk(dense, 8 * 256)
    assert pairs(rows, cols) == pairs(*want[:2])
    torch.testing.assert_close(values, dense[rows, cols], rtol=1e-5, atol=1e-5)
    m = torch.randint(1, 40, (2048,), generator=torch.Generator().manual_seed(3))
    pre = kernels.PreActivations(x, W_enc, b_enc, b_dec, impl, 8)
    rows, cols, values, smallest = pre.column_topk(m)
    want = ref.column_topk(dense, m)
    assert pairs(rows, cols) == pairs(*want[:2])
    torch.testing.assert_close(smallest, want[3], rtol=1e-5, atol=1e-5)


def test_encode_selected_and_decode_sparse_are_the_reference():
    x, W_enc, b_enc, b_dec = weights()
    W_dec = torch.randn(1024, 32)
    idx = torch.randint(0, 1024, (96, 12), generator=torch.Generator().manual_seed(1))
    up = torch.randn(96, 32)
    got_in, want_in = leaves(x, W_enc, b_enc, b_dec, W_dec), leaves(x, W_enc, b_enc, b_dec, W_dec)
    with torch.no_grad():
        values = ref.encode_selected(x, W_enc, b_enc, b_dec, idx)
    v = kernels.encode_selected(*got_in[:4], values, idx, impl="torch")
    out = kernels.decode_sparse(v, idx, got_in[4], got_in[3], impl="torch")
    want = ref.decode_sparse(ref.encode_selected(*want_in[:4], idx), idx, want_in[4], want_in[3])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    (out * up).sum().backward()
    (want * up).sum().backward()
    for a, b in zip(grads(got_in), grads(want_in)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_columns_and_dense_agree_and_a_stale_workspace_is_refused():
    x, W_enc, b_enc, b_dec = weights()
    pre = kernels.PreActivations(x, W_enc, b_enc, b_dec, "torch", 8)
    cols = torch.tensor([3, 100, 1000])
    narrow = pre.columns(cols)  # before the dense matrix exists: a product over the columns
    torch.testing.assert_close(narrow, pre.dense()[:, cols].clone(), rtol=1e-5, atol=1e-5)
    kernels.PreActivations(x * 2, W_enc, b_enc, b_dec, "torch", 8).dense()  # the next batch's
    with pytest.raises(RuntimeError, match="overwritten"):
        pre.dense()


@pytest.mark.parametrize("weighted", [False, True])
def test_topk_among_some_latents_is_the_reference(weighted):
    """The auxiliary losses' selection: the top k among some latents (ranked by weights ⊙ pre
    where weights are given), valued at ReLU(pre), ties to the lower index."""
    x, W_enc, b_enc, b_dec = weights(ties=True)
    cols = torch.arange(3, 1024, 4)
    w = torch.linspace(0.1, 1.0, len(cols)) if weighted else None
    dense = ref.pre_activations(x, W_enc, b_enc, b_dec)
    want_pos = ref.topk(dense[:, cols] if w is None else dense[:, cols] * w, 8)[1]
    for made_dense in (False, True):  # from a product over the columns, and from the dense matrix
        pre = kernels.PreActivations(x, W_enc, b_enc, b_dec, "torch", 8)
        if made_dense:
            pre.dense()
        values, indices = pre.topk_among(cols, 8, w)
        assert torch.equal(indices, cols[want_pos])
        torch.testing.assert_close(values, dense.gather(1, indices).relu(), rtol=1e-5, atol=1e-5)
