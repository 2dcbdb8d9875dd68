"""saekit.kernels' encoder: every impl against an independent dense reference, forward and
backward (through the sparse decoder), AuxK, the exact top-k selection and the dispatch;
the decoder and the sparse-row kernels on their own are tests/test_sparse_rows.py's.

The Triton kernels run in Triton's CPU interpreter, which must be on before triton is first
imported (triton's own tl.zeros, tl.sum, ... are @triton.jit functions decorated at import):
tests/conftest.py sets TRITON_INTERPRET=1 before importing torch.

The data (mostly small integers, compared exactly) and the dense reference are
tests/kernel_helpers.py's; bf16 on random (non-integer) data is compared with a stated
tolerance.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from saekit.kernels import TopKResult, decode_sparse, encode_topk, encode_topk_aux, resolve_impl, topk_impl
from saekit.kernels import dispatch
from saekit.kernels.select import pack_keys, topk_lower_index, unpack_keys
from tests.kernel_helpers import (DEVICE, HAS_TRITON, IMPLS, assert_grads_equal, dense_pre, fire, gen, int_sae,
                                  leaves, on_test_device, randn_sae, scatter_dense, stable_topk, triton_case)

pytestmark = pytest.mark.usefixtures(on_test_device.__name__)


# ---- dispatch -----------------------------------------------------------------------------


def test_resolve_impl(monkeypatch, caplog):
    assert resolve_impl("auto", "cpu") == "torch"
    assert resolve_impl("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("cuda", "cpu")
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert resolve_impl("triton", "cpu") == "triton"
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="needs CUDA tensors") as e:
            resolve_impl("triton", "cpu")
        assert "\n" not in str(e.value)
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="saekit.kernels"):
        resolve_impl("auto", "cpu")
        resolve_impl("auto", "cpu")
    assert len([r for r in caplog.records if r.name == "saekit.kernels"]) == 1


def test_import_and_torch_path_without_the_gpu_package():
    """`import saekit.kernels` must not need triton (macOS): block it and run the torch path."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'): raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, saekit.kernels as K\n"
        "assert 'triton' not in sys.modules\n"
        "x, W = torch.randn(5, 8), torch.randn(8, 20, requires_grad=True)\n"
        "t = K.encode_topk(x, W, torch.zeros(20), torch.zeros(8), 3)\n"
        "K.decode_sparse(t.values, t.indices, W.t(), None).sum().backward()\n"
        "assert K.resolve_impl('auto', 'cpu') == 'torch' and W.grad is not None\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---- exact top-k selection ------------------------------------------------------------------


def test_keys_round_trip_and_order():
    v = torch.tensor([[3.0, -0.0, 0.0, -1.5, 3.0, float("inf"), -float("inf"), 1e-30]])
    i = torch.arange(v.shape[1]).expand_as(v)
    vals, idx = unpack_keys(pack_keys(v, i))
    assert torch.equal(idx, i) and torch.equal(vals, v + 0.0)  # -0.0 comes back as +0.0
    order = pack_keys(v, i).argsort(descending=True)[0].tolist()
    assert order == [5, 0, 4, 7, 1, 2, 3, 6]  # value desc; 3.0 and the zeros: lower index first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,group,n_super", [
    (333, 7, 8, None),    # direct path (row too short for the groups)
    (333, 5, 4, 10),      # hierarchical, tail elements outside the groups, leftover groups
    (200, 32, 3, 33),     # hierarchical with the largest k its shape allows
    (4096, 32, 8, None),  # the default hierarchical configuration
    (64, 64, 8, None),    # k == n
])
def test_topk_lower_index_matches_stable_sort(dtype, n, k, group, n_super):
    g = gen(n + k)
    for scores in (torch.randint(-3, 4, (41, n), generator=g).to(dtype),   # ties everywhere
                   torch.randn(41, n, generator=g).to(dtype)):
        v, i = topk_lower_index(scores, k, group=group, n_super=n_super)
        rv, ri = stable_topk(scores, k)
        assert torch.equal(i, ri) and torch.equal(v, rv)


def test_topk_lower_index_zero_signs_tie():
    scores = torch.tensor([[-0.0, 0.0, -1.0, 0.0]])
    _, i = topk_lower_index(scores, 2)
    assert i.tolist() == [[0, 1]]


# ---- encoder forward ---------------------------------------------------------------------------

SHAPES = [(24, 200, 1), (40, 333, 7), (24, 200, 32), (40, 333, 5)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_in,d_sae,k", SHAPES)
def test_encode_topk_matches_dense_reference(impl, dtype, d_in, d_sae, k):
    x, W_enc, b_enc, b_dec, _ = int_sae(d_in, d_sae, 37, dtype, seed=k)
    top = encode_topk(x, W_enc, b_enc, b_dec, k, impl=impl)
    assert isinstance(top, TopKResult) and top.values.dtype == dtype and top.indices.dtype == torch.int64
    rv, ri = stable_topk(dense_pre(x, W_enc, b_enc, b_dec), k)
    assert torch.equal(top.indices, ri)
    assert torch.equal(top.values, rv.relu())
    # the scattered code is exactly scatter(topk(ReLU(pre), k)) as well
    rv2, ri2 = stable_topk(dense_pre(x, W_enc, b_enc, b_dec).relu(), k)
    assert torch.equal(scatter_dense(top.values, top.indices, d_sae), scatter_dense(rv2, ri2, d_sae))


@triton_case
@pytest.mark.parametrize("dtype,tol,gap", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2**-6, 2**-5)])
def test_encode_topk_random_data_torch_and_triton_agree(dtype, tol, gap):
    """Random data: the two impls sum in different orders, and torch's bf16 addmm on CPU can
    round twice (observed: 2 ulp apart), so values agree within `tol` relative (bf16: 2**-6,
    two ulp) and indices agree on the rows whose k-th and (k+1)-th pre-activations are more
    than `gap` apart (relative)."""
    d_in, d_sae, k = 40, 333, 7
    x, W_enc, b_enc, b_dec, _ = randn_sae(d_in, d_sae, 37, dtype)
    a = encode_topk(x, W_enc, b_enc, b_dec, k, impl="torch")
    b = encode_topk(x, W_enc, b_enc, b_dec, k, impl="triton")
    torch.testing.assert_close(a.values.float(), b.values.float(), rtol=tol, atol=tol)
    s = dense_pre(*[t.float() for t in (x, W_enc, b_enc, b_dec)]).sort(dim=1, descending=True).values
    clear = (s[:, k - 1] - s[:, k]) > gap * s[:, k - 1].abs().clamp(min=1)
    assert clear.sum() >= 10
    assert torch.equal(a.indices[clear], b.indices[clear])


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_topk_leading_dims_and_validation(impl):
    x, W_enc, b_enc, b_dec, _ = int_sae(24, 200, 12)
    top = encode_topk(x.view(3, 4, 24), W_enc, b_enc, b_dec, 5, impl=impl)
    flat = encode_topk(x, W_enc, b_enc, b_dec, 5, impl=impl)
    assert top.indices.shape == (3, 4, 5) and torch.equal(top.indices.view(12, 5), flat.indices)
    with pytest.raises(ValueError, match="k must be"):
        encode_topk(x, W_enc, b_enc, b_dec, 201, impl=impl)
    with pytest.raises(ValueError, match="one dtype"):
        encode_topk(x, W_enc.bfloat16(), b_enc, b_dec, 5, impl=impl)


# ---- encoder + decoder backward against dense autograd ------------------------------------------


def sparse_pipeline(impl, x, W_enc, b_enc, b_dec, W_dec, k):
    top = encode_topk(x, W_enc, b_enc, b_dec, k, impl=impl)
    return decode_sparse(top.values, top.indices, W_dec, b_dec, impl=impl)


def dense_pipeline(x, W_enc, b_enc, b_dec, W_dec, k):
    pre = (x - b_dec) @ W_enc + b_enc
    _, idx = stable_topk(pre.detach(), k)
    f = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    return f @ W_dec + b_dec


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("d_in,d_sae,k", [(40, 333, 7), (24, 200, 32)])
def test_backward_matches_dense_autograd(impl, x_grad, d_in, d_sae, k):
    params = int_sae(d_in, d_sae, 37, seed=d_sae + k)
    up = torch.randint(-3, 4, (37, d_in), generator=gen(1)).float()
    got_leaves = leaves(*params, x_grad=x_grad)
    want_leaves = leaves(*params, x_grad=x_grad)
    got = fire((sparse_pipeline(impl, *got_leaves, k), got_leaves), up)
    want = fire((dense_pipeline(*want_leaves, k), want_leaves), up)
    assert_grads_equal(got, want)  # integer data: exact
    # W_enc's gradient arrives in W_enc's own layout
    assert got_leaves[1].grad.stride() == got_leaves[1].stride()


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_bf16(impl):
    """bf16 params, random data: grads within 3e-2 of the largest (bf16 output rounding) of
    fp32 dense autograd through the same selection."""
    params = randn_sae(40, 333, 37, torch.bfloat16, seed=3)
    up = torch.randn(37, 40, generator=gen(2))
    got_leaves = leaves(*params)
    top = encode_topk(*got_leaves[:4], 7, impl=impl)
    x_hat = decode_sparse(top.values, top.indices, got_leaves[4], got_leaves[3], impl=impl)
    got = fire((x_hat, got_leaves), up)
    want_leaves = leaves(*[p.float() for p in params])
    x, W_enc, b_enc, b_dec, W_dec = want_leaves
    pre = (x - b_dec) @ W_enc + b_enc
    f = torch.zeros_like(pre).scatter(1, top.indices, pre.gather(1, top.indices).relu())
    want = fire((f @ W_dec + b_dec, want_leaves), up)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


# ---- AuxK -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_dead,k_aux", [(60, 16), (9, 16), (0, 16), (333, 100), (100, 50)])
def test_encode_topk_aux(impl, n_dead, k_aux):
    d_in, d_sae, k = 40, 333, 7
    params = int_sae(d_in, d_sae, 37, seed=n_dead)
    g = gen(n_dead)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=g)[:n_dead]] = True
    up = torch.randint(-2, 3, (37, d_in), generator=g).float()
    up_aux = torch.randint(-2, 3, (37, d_in), generator=g).float()

    lv = leaves(*params)
    top, aux = encode_topk_aux(*lv[:4], k, dead, k_aux, impl=impl)
    x, W_enc, b_enc, b_dec, W_dec = lv
    assert aux.values.shape == (37, min(k_aux, n_dead)) and aux.indices.dtype == torch.int64
    x_hat = decode_sparse(top.values, top.indices, W_dec, b_dec, impl=impl)
    e_hat = decode_sparse(aux.values, aux.indices, W_dec, None, impl=impl)  # AuxK: no b_dec
    ((x_hat * up).sum() + (e_hat * up_aux).sum()).backward()

    rv, ri = stable_topk(dense_pre(*params[:4]).masked_fill(~dead, float("-inf")), min(k_aux, n_dead))
    assert torch.equal(aux.indices, ri) and torch.equal(aux.values, rv.relu())
    assert bool(dead[aux.indices].all())
    assert torch.equal(top.indices, encode_topk(*params[:4], k, impl=impl).indices)

    dl = leaves(*params)
    x, W_enc, b_enc, b_dec, W_dec = dl
    pre = (x - b_dec) @ W_enc + b_enc
    f = torch.zeros_like(pre).scatter(1, ri, pre.gather(1, ri).relu())
    x_hat_d = dense_pipeline(*dl, k)
    ((x_hat_d * up).sum() + ((f @ W_dec) * up_aux).sum()).backward()
    assert_grads_equal([t.grad for t in lv], [t.grad for t in dl])


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_topk_aux_wider_than_the_fused_kernel(impl):
    """k_aux above TRITON_MAX_K (AuxK's default d_in/2 once d_in > 1024): the AuxK
    selection ranks the dead columns only, with no width limit; it equals the dense
    reference and carries the same sparse backward. Once raised under impl="triton"."""
    d_in, d_sae, k, k_aux, B = 8, 700, 3, dispatch.TRITON_MAX_K + 88, 5
    params = int_sae(d_in, d_sae, B, seed=3)
    g = gen(3)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=g)[:650]] = True
    up, up_aux = (torch.randint(-2, 3, (B, d_in), generator=g).float() for _ in range(2))

    lv = leaves(*params)
    top, aux = encode_topk_aux(*lv[:4], k, dead, k_aux, impl=impl)
    x_hat = decode_sparse(top.values, top.indices, lv[4], lv[3], impl="torch")
    e_hat = decode_sparse(aux.values, aux.indices, lv[4], None, impl="torch")
    ((x_hat * up).sum() + (e_hat * up_aux).sum()).backward()

    rv, ri = stable_topk(dense_pre(*params[:4]).masked_fill(~dead, float("-inf")), k_aux)
    assert torch.equal(aux.indices, ri) and torch.equal(aux.values, rv.relu())
    assert torch.equal(top.indices, stable_topk(dense_pre(*params[:4]), k)[1])
    dl = leaves(*params)
    x, W_enc, b_enc, b_dec, W_dec = dl
    pre = (x - b_dec) @ W_enc + b_enc
    f = torch.zeros_like(pre).scatter(1, ri, pre.gather(1, ri).relu())
    ((dense_pipeline(*dl, k) * up).sum() + ((f @ W_dec) * up_aux).sum()).backward()
    assert_grads_equal([t.grad for t in lv], [t.grad for t in dl])


@triton_case
def test_triton_training_keeps_running_once_more_latents_die_than_the_kernel_holds():
    """A Triton run whose AuxK k_aux (600) exceeds TRITON_MAX_K: after step 1 most latents
    are dead (dead_tokens=1), and the following steps train on them instead of refusing."""
    from saekit.sae import SAE, SAEConfig
    from saekit.training.config import OptimOptions, TrainConfig
    from saekit.training.trainer import Trainer

    with torch.device("cpu"):  # the SAE's init draws from a CPU generator
        sae = SAE(SAEConfig(d_in=8, d_sae=700, k=3, impl="triton"), seed=0).to(DEVICE)
    trainer = Trainer(sae, TrainConfig(optim=OptimOptions(k_aux=600, dead_tokens=1, warmup_steps=0)), total_steps=3)
    x = torch.randn(6, 8, generator=gen(0))
    stats = [trainer.train_step(x) for _ in range(3)]
    assert stats[0].aux == 0 and stats[1].dead_frac > 600 / 700
    assert all(s.aux > 0 for s in stats[1:])


def test_auto_follows_the_measured_gpu_table_and_triton_refuses_a_k_wider_than_the_fused_kernel():
    """impl="auto" (the H200 table of benchmarks/gpu_check.sh): Triton on CUDA only for bf16
    operands at k <= AUTO_TRITON_MAX_K, torch otherwise (fp32, wider k, unknown dtype or k, CPU);
    explicit impl="triton" with k > TRITON_MAX_K refuses in one line."""
    bf16, small, wide = torch.bfloat16, dispatch.AUTO_TRITON_MAX_K, dispatch.AUTO_TRITON_MAX_K + 1
    assert resolve_impl("auto", "cuda", bf16, small) == ("triton" if HAS_TRITON else "torch")
    for args in [("cuda",), ("cuda", torch.float32, 32), ("cuda", bf16, wide), ("cuda", bf16, None),
                 ("cuda", torch.float16, 32), ("cpu", bf16, 32)]:
        assert resolve_impl("auto", *args) == "torch", args
    k = dispatch.TRITON_MAX_K + 1
    x, W_enc, b_enc, b_dec, _ = int_sae(8, 600, 4)
    assert topk_impl("auto", x, W_enc, k) == "torch"
    top = encode_topk(x, W_enc, b_enc, b_dec, k, impl="auto")
    assert torch.equal(top.indices, stable_topk(dense_pre(x, W_enc, b_enc, b_dec), k)[1])
    if HAS_TRITON:
        with pytest.raises(ValueError, match=f"supports k <= {dispatch.TRITON_MAX_K}") as e:
            encode_topk(x, W_enc, b_enc, b_dec, k, impl="triton")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("sparsity,refused", [("topk", True), ("gtopk", True), ("mutual_choice", False)])
def test_trainer_refuses_an_unsupported_kernel_setting_before_step_1(sparsity, refused):
    """k > TRITON_MAX_K under impl="triton" is refused when the trainer is built, not at its
    first encoder call; sparsifiers that do not run the fused TopK encoder are not refused."""
    from saekit.errors import ConfigError
    from saekit.sae import SAE, SAEConfig
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import Trainer

    k = dispatch.TRITON_MAX_K + 1
    with torch.device("cpu"):
        sae = SAE(SAEConfig(d_in=8, d_sae=1024, k=k, impl="triton", sparsity=sparsity), seed=0).to(DEVICE)
    if not refused:
        Trainer(sae, TrainConfig(), total_steps=1)
        return
    with pytest.raises(ConfigError, match=rf"supports k <= {dispatch.TRITON_MAX_K} .*, got k={k};") as e:
        Trainer(sae, TrainConfig(), total_steps=1)
    assert "\n" not in str(e.value)


def test_encode_topk_aux_validation():
    x, W_enc, b_enc, b_dec, _ = int_sae(24, 200, 5)
    with pytest.raises(ValueError, match="dead_mask"):
        encode_topk_aux(x, W_enc, b_enc, b_dec, 3, torch.zeros(199, dtype=torch.bool), 4)


# ---- the Triton pieces directly ----------------------------------------------------------------------------


@triton_case
def test_triton_plan_bounds_the_candidate_buffer(monkeypatch):
    """Under the interpreter and on GPU: the [B, n_chunks, k_pad] int64 candidate buffer stays
    under 1/8 of the [B, d_sae] pre-activation matrix it replaces (one chunk at least)."""
    from saekit.kernels import encoder_triton as et

    for interp in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        for d_sae in (4096, 32768, 131072):
            for elt in (2, 4):
                for k_pads in (32, 128, 32 + 512):
                    p = et._plan(4096, d_sae, elt, k_pads)
                    assert p["n_chunks"] * p["tiles_per_chunk"] * p["BLOCK_N"] >= d_sae
                    if k_pads * 8 <= d_sae * elt / 8:
                        assert p["n_chunks"] * k_pads * 8 <= d_sae * elt / 8
                    else:
                        assert p["n_chunks"] == 1
