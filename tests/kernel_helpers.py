"""Data, the dense reference and gradient checks shared by tests/test_kernels.py (the
encoder) and tests/test_sparse_rows.py (the decoder and the sparse-row kernels).

Most data is small integers (x, W in {-2..2}): every product and sum is exact in fp32 and
bf16 (|pre| < 256), so results can be compared exactly, and values repeat, so ties at the
k-th place are common and the rule "the lower index wins" is exercised. The dense reference
ranks with a stable descending sort, which keeps the lower index first among equal values.
"""

from __future__ import annotations

import os

import pytest
import torch

from saekit.kernels import dispatch

HAS_TRITON = dispatch.triton_available()
# tests/conftest.py turns the interpreter on before anything imports triton; only a machine
# without the triton package (macOS) skips the Triton cases.
triton_case = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")
# Where the kernel tests (test_kernels.py, test_sparse_rows.py) make their tensors: the CPU,
# or with SAEKIT_TEST_DEVICE=cuda (and TRITON_INTERPRET=0) the GPU, where the Triton kernels
# are compiled, not interpreted (benchmarks/gpu_check.sh runs them so).
DEVICE = torch.device(os.environ.get("SAEKIT_TEST_DEVICE", "cpu"))
# "screen" is the CPU encoder that ranks through a bf16 matmul (kernels/screen.py): on this
# integer data its bound is ~1e-5 wide, so the tests' exact comparisons hold for it as well.
IMPLS = ["torch", *(["screen"] if DEVICE.type == "cpu" else []), pytest.param("triton", marks=triton_case)]


@pytest.fixture
def on_test_device():
    """Tensors made without a device go to ``DEVICE`` (a no-op on the CPU)."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


def gen(seed: int) -> torch.Generator:
    """A seeded generator on ``DEVICE`` (random data differs between devices; the tests
    compare each impl with a reference computed on the same data)."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


# ---- data and the dense reference --------------------------------------------------------


def int_sae(d_in, d_sae, B, dtype=torch.float32, seed=0):
    """x, W_enc, b_enc, b_dec, W_dec with small integer entries: exact arithmetic, many ties."""
    g = gen(seed)
    r = lambda *s, lo=-2, hi=3: torch.randint(lo, hi, s, generator=g).to(dtype)  # noqa: E731
    return r(B, d_in), r(d_in, d_sae), r(d_sae), r(d_in, lo=-1, hi=2), r(d_sae, d_in)


def randn_sae(d_in, d_sae, B, dtype=torch.float32, seed=0):
    g = gen(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return r(B, d_in), r(d_in, d_sae) / d_in**0.5, r(d_sae) * 0.1, r(d_in) * 0.1, r(d_sae, d_in) / d_in**0.5


def stable_topk(scores, k):
    """Top-k with the lower index first among equal values: a stable descending sort."""
    v, i = torch.sort(scores, dim=-1, descending=True, stable=True)
    return v[..., :k], i[..., :k]


def dense_pre(x, W_enc, b_enc, b_dec):
    return ((x.float() - b_dec.float()).to(x.dtype).float() @ W_enc.float() + b_enc.float()).to(x.dtype)


def scatter_dense(values, indices, d_sae):
    return torch.zeros(*values.shape[:-1], d_sae, dtype=values.dtype).scatter_add(-1, indices, values)


def fire(f_dense_and_leaves, upstream):
    """Sum(output * upstream) backward; returns the grads of the leaves."""
    out, leaves = f_dense_and_leaves
    (out.float() * upstream).sum().backward()
    return [t.grad for t in leaves]


def leaves(*ts, x_grad=True):
    out = [t.detach().clone().requires_grad_(True) for t in ts]
    out[0].requires_grad_(x_grad)
    return out


def assert_grads_equal(got, want, atol=0.0, rtol=0.0):
    for name, a, b in zip(["x", "W_enc", "b_enc", "b_dec", "W_dec"], got, want):
        if b is None:
            assert a is None, name
            continue
        assert a is not None, name
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")
