"""Mutual Choice, Feature Choice, g-TopK and aux_zipf (methods.md §2–§5)."""

import pytest
import torch

from saekit import SAE, SAEConfig
from saekit.cli import main
from saekit.types import VariantOptions
from saekit.sparsity import mask_to_codes
from saekit.training import TrainConfig, train_sae
from saekit.training.config import DataOptions, OptimOptions, RunOptions
from saekit.training.losses import auxk_loss, encode_with_aux, total_variance, zipf_weights
from tests.test_training import TINY, synthetic


def sae_of(sparsity, d_in=32, d_sae=128, k=4, **variant):
    return SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, sparsity=sparsity, variant=VariantOptions(**variant)), seed=0)


def _entries(codes):
    """(rows, cols, values) of padded codes' entries."""
    inside = torch.arange(codes.indices.shape[1]) < codes.lengths[:, None]
    rows = torch.arange(len(codes.indices))[:, None].expand_as(codes.indices)
    return rows[inside], codes.indices[inside], codes.values[inside]


def _mask(a, rows, cols):
    mask = torch.zeros_like(a, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def test_mask_to_codes_round_trips():
    a = torch.rand(5, 9)
    mask = torch.rand(5, 9) > 0.6
    mask[2] = False  # an empty row pads with zeros
    codes = mask_to_codes(a, mask)
    assert torch.equal(codes.dense(9), a * mask)


@pytest.mark.parametrize("sparsity", ["mutual_choice", "batchtopk", "matryoshka"])
def test_mutual_choice_keeps_exactly_k_times_batch(sparsity):
    """Mutual Choice, and BatchTopK and Matryoshka (the same selection, one implementation):
    exactly k·B of the batch's largest activations, over all tokens and latents together."""
    sae = sae_of(sparsity).train()
    x = torch.randn(64, 32)
    codes = sae.encode(x)
    assert int((codes.values > 0).sum()) == 4 * 64
    a = sae.pre_acts(x).relu()
    rows, cols, values = _entries(codes)
    mask = _mask(a, rows, cols)
    top = a.flatten().topk(4 * 64)
    assert torch.equal(mask.flatten().nonzero().flatten().sort().values, top.indices.sort().values)
    assert torch.equal(values, a[rows, cols]) and values.min() == top.values.min()
    # one token holding the batch's 128 largest values
    with torch.no_grad():
        sae.b_dec[:] = 0
        sae.W_enc_T.copy_(1 / 32 + 0.01 * torch.randn(128, 32))  # every latent reads about the mean input
        sae.b_enc.zero_()
    x2 = torch.rand(64, 32)
    x2[0] += 100
    a2 = sae.pre_acts(x2).relu()
    mask2 = _mask(a2, *_entries(sae.encode(x2))[:2])
    assert int(mask2[0].sum()) == 128 and int(mask2.sum()) == 4 * 64


@pytest.mark.parametrize("case", ["random", "one_row", "ties", "ragged_tail", "constant"])
def test_global_topk_equals_the_flat_topk(case):
    """kernels.select.global_topk (Mutual Choice's selection) keeps the n largest entries of
    the matrix, on its fast path (fast_from=0) and its fallbacks."""
    from saekit.kernels.select import _grouped_global_topk, global_topk

    g = torch.Generator().manual_seed(3)
    R, C, n = 96, 203 if case == "ragged_tail" else 200, 400
    s = torch.randn(R, C, generator=g)
    if case == "one_row":
        s[5] += 100  # one row holds the C largest entries
    elif case == "ties":
        s = torch.randint(-4, 5, (R, C), generator=g).float()
    elif case == "constant":
        s = torch.zeros(R, C)
    # margin 2: a 141-entry sample estimates the threshold loosely; at B=4096 1.25 does
    fast = _grouped_global_topk(s, n, group=8, sample_step=17, margin=2.0)
    assert (fast is None) == (case == "constant")  # every group passes: more than 4n
    for rows, cols, values in [global_topk(s, n, fast_from=0), *([fast] if fast else [])]:
        assert len(rows) == n and torch.equal(values, s[rows, cols])
        assert len(set(zip(rows.tolist(), cols.tolist()))) == n  # n distinct entries
        assert torch.equal(values.sort().values, s.flatten().topk(n).values.sort().values)


def test_feature_choice_keeps_exactly_m_j_per_latent():
    for capacity in ("uniform", "zipf"):
        sae = sae_of("feature_choice", capacity=capacity).train()
        fc = sae.sparsifier
        if capacity == "zipf":
            fc.rank.copy_(torch.randperm(128).float() + 1)
        x = torch.randn(256, 32)
        m = fc.capacities(256)
        assert int(m.sum()) == 4 * 256 and (m >= 1).all()
        a = sae.pre_acts(x).relu()
        rows, cols, values = _entries(sae.encode(x))
        assert torch.equal(_mask(a, rows, cols).sum(0), m)
        torch.testing.assert_close(values, a[rows, cols], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["uniform", "zipf", "ties", "tail_rows"])
def test_column_topk_keeps_each_columns_largest(case):
    """kernels.select.column_topk (Feature Choice's selection): column j keeps its m[j]
    largest entries, on the grouped path (fast_from=0) and the direct one."""
    from saekit.kernels.select import column_topk

    g = torch.Generator().manual_seed(4)
    R, C = (203 if case == "tail_rows" else 256), 96
    s = torch.randint(-3, 4, (R, C), generator=g).float() if case == "ties" else torch.randn(R, C, generator=g)
    if case == "zipf":  # a few wide columns (m > narrow_max) take the direct path
        m = (200 / torch.arange(1, C + 1).float()).ceil().long().clamp(1, R)
    else:
        m = torch.randint(1, 6, (C,), generator=g)
    rows, cols, values, smallest = column_topk(s, m, fast_from=0)
    assert torch.equal(values, s[rows, cols]) and torch.equal(torch.bincount(cols, minlength=C), m)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == len(rows)
    for j in range(C):
        want = s[:, j].topk(int(m[j])).values
        assert torch.equal(values[cols == j].sort().values, want.sort().values)
        assert smallest[j] == want[-1]


def test_feature_choice_leaves_no_dead_latents_after_training():
    x = synthetic(n=8192, d=32)
    cfg = TrainConfig(sae=SAEConfig(d_sae=128, k=4, sparsity="feature_choice"),
                      data=DataOptions(batch_size=512, fill_tokens=4096, total_tokens=512 * 120),
                      optim=OptimOptions(lr=3e-3, warmup_steps=10, dead_tokens=2048), run=RunOptions(progress=False))
    sae = train_sae(x, cfg).eval()
    counts = (sae.encode_dense(x) > 0).sum(0)
    assert (counts > 0).all(), f"{int((counts == 0).sum())} latents never fire"


@pytest.mark.parametrize("sparsity", ["mutual_choice", "feature_choice"])
def test_threshold_inference_matches_the_batch_rule(sparsity):
    """Tolerance: on fresh data from the training distribution the thresholded code agrees
    with the batch rule on ≥ 85% of its active entries, and its mean L0 is within 20% of k."""
    x = synthetic(n=16384, d=32)
    cfg = TrainConfig(sae=SAEConfig(d_sae=128, k=4, sparsity=sparsity),
                      data=DataOptions(batch_size=512, fill_tokens=8192, total_tokens=512 * 150),
                      optim=OptimOptions(lr=3e-3, warmup_steps=10), run=RunOptions(progress=False))
    sae = train_sae(x[:8192], cfg)
    fresh = x[8192:8192 + 512]
    sae.train()
    with torch.no_grad():
        a = sae.pre_acts(fresh).relu()
        batch_mask = _mask(a, *_entries(sae.encode(fresh))[:2])
        sae.eval()
        thr_mask = sae.encode_dense(fresh) > 0
    overlap = (batch_mask & thr_mask).sum() / batch_mask.sum()
    assert overlap >= 0.85, overlap
    assert abs(thr_mask.sum(1).float().mean() - 4) <= 0.8


@pytest.mark.parametrize("sparsity", ["mutual_choice", "feature_choice", "gtopk"])
def test_sparse_backward_of_selected_latents_matches_dense_autograd(sparsity):
    """Batch-level and gradient-aware selections train through kernels.encode_selected; its
    gradients equal autograd through the dense ReLU(pre-activations) at the same selection."""
    sae = sae_of(sparsity, beta=2.0).train()
    x, g = torch.randn(48, 32, requires_grad=True), torch.randn(48, 32)
    w = torch.randn(48, 32)
    codes = sae.encode(x, g)
    (sae.decode(codes) * w).sum().backward()
    sparse = [t.grad.clone() for t in (x, sae.W_enc_T, sae.b_enc, sae.b_dec)]
    for t in (x, sae.W_enc_T, sae.b_enc, sae.b_dec, sae.W_dec):
        t.grad = None
    dense = sae.pre_acts(x).relu().gather(1, codes.indices) * (codes.values > 0)
    (sae.decode(codes._replace(values=dense)) * w).sum().backward()
    for got, want in zip(sparse, (x.grad, sae.W_enc_T.grad, sae.b_enc.grad, sae.b_dec.grad)):
        assert torch.allclose(got, want, atol=1e-5)


def test_gtopk_with_beta_zero_is_topk_and_gradient_changes_selection():
    topk, g0 = sae_of("topk"), sae_of("gtopk", beta=0.0)
    x, grad = torch.randn(16, 32), torch.randn(16, 32)
    assert torch.equal(topk.encode_dense(x), g0.encode_dense(x, grad))
    g = sae_of("gtopk", beta=4.0)
    assert torch.equal(g.encode_dense(x), topk.encode_dense(x))  # no gradient: plain TopK
    a = g.pre_acts(x).relu()
    j = int(a[0].topk(5).indices[4])  # ranked 5th: just outside the top 4
    grad = torch.zeros(16, 32)
    grad[0] = 50 * g.W_dec[j]  # the loss is very sensitive along latent j's direction
    assert (g.encode_dense(x) > 0)[0, j] == False  # noqa: E712
    assert (g.encode_dense(x, grad) > 0)[0, j] == True  # noqa: E712
    torch.testing.assert_close(g.encode_dense(x, grad)[0, j], a[0, j])  # the value is the activation


@pytest.mark.parametrize("grad_norm", ["rms", "none"])
def test_gtopk_scores_follow_the_formula(grad_norm):
    """s = ReLU(pre) ⊙ (1 + β·|g W_decᵀ| / rms) (methods.md §5), computed in place."""
    g = sae_of("gtopk", beta=1.5, grad_norm=grad_norm)
    x, grad = torch.randn(16, 32), torch.randn(16, 32)
    pre = g.pre_acts(x)
    effect = (grad @ g.W_dec.T).abs()
    if grad_norm == "rms":
        effect = effect / effect.pow(2).mean(1, keepdim=True).sqrt()
    want = pre.relu() * (1 + 1.5 * effect)
    torch.testing.assert_close(g.sparsifier.scores(pre.detach().clone(), g.effect(grad)), want.detach())


def test_aux_zipf_equals_auxk_when_only_dead_latents_qualify():
    d_sae = 128
    ranks = torch.arange(1, d_sae + 1).float()
    freq = 0.3 * ranks.pow(-1.1)  # alive latents on an exact Zipf line
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[-20:] = True
    freq[dead] = 0.0
    w = zipf_weights(freq, dead, tail_frac=0.2, gamma=0.5)
    assert torch.equal(w, dead.float())
    sae = sae_of("topk", d_sae=d_sae)
    x = torch.randn(64, 32)
    enc_auxk = encode_with_aux(sae, x, None, dead.float(), 8)
    enc_zipf = encode_with_aux(sae, x, None, w, 8)
    x_hat = sae.decode(enc_auxk.codes)
    denom = total_variance(x)
    la = auxk_loss(sae, x, x_hat, enc_auxk.aux, 20, 16, 1 / 32, denom)["aux"]
    lz = auxk_loss(sae, x, x_hat, enc_zipf.aux, int((w > 0).sum()), 16, 1 / 32, denom)["aux"]
    assert la.item() > 0 and torch.equal(la, lz)
    # latents that fire, but far below the line at their rank, get weights in (0, 1)
    freq[-30:-20] = freq[-30:-20] * 0.1
    w2 = zipf_weights(freq, dead)
    assert ((w2[-30:-20] > 0) & (w2[-30:-20] < 1)).all()
    assert (w2[:-30] == 0).all() and (w2[-20:] == 1).all()


@pytest.mark.parametrize("sparsity, aux", [("mutual_choice", "auxk"), ("feature_choice", "zipf"), ("topk", "zipf"),
                                         ("batchtopk", "auxk")])
def test_variants_train_end_to_end_through_the_cli(sparsity, aux, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--sparsity", sparsity, "--aux", aux, "--out", str(out), *TINY]) == 0
    assert "explained variance" in capsys.readouterr().out
    from saekit import load_sae
    sae = load_sae(out)
    assert sae.cfg.sparsity == sparsity
    if sparsity != "topk":
        assert float(sae.sparsifier.theta.abs().sum()) > 0  # thresholds were learned and saved


def test_harvested_gradients_match_autograd(model):
    from saekit.activations import harvest_with_grads, resolve_hook
    from saekit.metrics import next_token_loss

    hook = resolve_hook(model, "blocks.3.attn.hook_z")
    tokens = next(__import__("saekit.data", fromlist=["x"]).token_batches(model.tokenizer, None, 24, 3))
    x, grad = harvest_with_grads(model, tokens, hook)
    d_in = hook.d_in
    assert x.shape == grad.shape == (3 * 23, d_in)
    delta = torch.zeros(3, 24, *hook.shape, requires_grad=True)  # x + δ: ∂L/∂δ = ∂L/∂x
    logits = model.run_with_hooks(tokens, fwd_hooks=[(hook.name, lambda a, hook=None: a + delta)])
    (next_token_loss(logits, tokens) * 3 * 23).backward()
    expect = delta.grad[:, 1:].reshape(-1, d_in)
    torch.testing.assert_close(grad, expect, atol=1e-6, rtol=1e-4)
    assert grad.abs().sum() > 0
    from saekit.activations import harvest
    torch.testing.assert_close(x, harvest(model, tokens, hook))


def test_gtopk_trains_end_to_end_with_harvested_gradients(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--sparsity", "gtopk", "--beta", "2", "--out", str(out), *TINY]) == 0
    assert "explained variance" in capsys.readouterr().out
    import json
    summary = json.loads((out / "summary.json").read_text())
    g = summary["with_model_gradients"]  # evaluated selecting with (label-free) gradients too
    assert 0 < g["explained_variance"] <= 1 and abs(g["l0"] - 8) < 1e-6
    assert g["positions"] > 0 and g["ce_loss_sae_with_grads_last"] > 0 and g["ce_loss_sae_topk_last"] > 0
    assert "with_grads" not in summary and "no text labels" in g["gradients"]
    args = ["--fill-tokens", "4064", "--batch-size", "512", "--total-tokens", "4064"]
    assert main(["cache", "--with-grads", "--out", str(tmp_path / "c"), *args]) == 0
    from saekit.activations import CachedActivations
    shard = CachedActivations(tmp_path / "c").fill(0)
    assert shard.x.shape == shard.grad.shape == (4064, 128)
    assert main(["train", "--sparsity", "gtopk", "--from-cache", str(tmp_path / "c"), "--out", str(tmp_path / "g"),
                 "--eval-tokens", "0", "--progress", "false", "--d-sae", "256", *args]) == 0
    assert main(["cache", "--out", str(tmp_path / "plain"), *args]) == 0
    assert main(["train", "--sparsity", "gtopk", "--from-cache", str(tmp_path / "plain"),
                 "--out", str(tmp_path / "h"), "--progress", "false", *args]) == 2
    assert "needs gradients" in capsys.readouterr().err


@pytest.mark.parametrize("sparsity", ["topk", "mutual_choice", "feature_choice"])
def test_encoding_under_inference_mode_matches_no_grad_and_leaves_no_inference_buffer(sparsity):
    """The encoders' reused workspace and the ragged-code cache work under
    torch.inference_mode, and a first call there does not break later calls."""
    import threading

    results = {}

    def run():  # a fresh thread: its workspace is first made under inference_mode
        sae, x = sae_of(sparsity).eval(), torch.randn(40, 32)
        with torch.inference_mode():
            results["inference"] = sae(x).x_hat.clone()
        with torch.no_grad():
            results["no_grad"] = sae(x).x_hat
        results["train"] = sae.train()(x).x_hat.detach()  # writes the workspace again

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert torch.equal(results["inference"], results["no_grad"]) and results["train"].isfinite().all()


def test_global_topk_ranks_nan_first_like_torch_topk():
    from saekit.kernels.select import global_topk

    s = torch.randn(256, 64, generator=torch.Generator().manual_seed(9))
    s[100, 33] = float("nan")
    rows, cols, values = global_topk(s, 300, fast_from=0)
    assert (100, 33) in set(zip(rows.tolist(), cols.tolist())) and values.isnan().sum() == 1


def test_model_target_gradients_never_read_the_final_label():
    """activation_and_grad(targets="model") scores the loss against the model's own greedy
    predictions: the last token, which only ever serves as a label, cannot change it (with
    the text's tokens as targets it does)."""
    import saekit
    from saekit.activations import activation_and_grad, resolve_hook

    model = saekit.load_model()
    hook = resolve_hook(model, "blocks.3.attn.hook_z")
    t = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    t2 = t.clone()
    t2[:, -1] = (t2[:, -1] + 1) % 400
    g_model = [activation_and_grad(model, s, hook, "model")[1] for s in (t, t2)]
    g_text = [activation_and_grad(model, s, hook, "tokens")[1] for s in (t, t2)]
    assert torch.equal(g_model[0], g_model[1])
    assert not torch.allclose(g_text[0], g_text[1])


def test_zipf_capacities_follow_measured_firing_frequencies():
    """Feature Choice with zipf capacities ranks latents by how often ReLU(pre) fires, not by
    the share its capacity let it keep (which would keep latent 0 biggest forever)."""
    sae = sae_of("feature_choice", capacity="zipf", rerank_every=5).train()
    never, always = torch.arange(4), 127
    with torch.no_grad():
        sae.b_enc[never] = -1e3  # never fire
        sae.b_enc[always] = 1e3  # fires on every token
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        sae.encode(torch.randn(256, 32, generator=g), update=True)
    fc = sae.sparsifier
    m = fc.capacities(256)
    others = m[4:127]
    assert int(fc.rank[always]) == 1 and m[always] == m.max() and m[always] > others.max()
    assert m[never].max() <= others.min()
    assert (fc.freq[never] == 0).all() and torch.isclose(fc.freq[always], torch.tensor(1.0), atol=1e-4)


@pytest.mark.parametrize("sparsity", ["mutual_choice", "feature_choice"])
def test_train_sae_returns_eval_mode_and_encode_never_moves_thresholds(sparsity):
    """train_sae hands the SAE back in eval mode, and no encode outside the trainer's step
    (not even in train mode) changes the saved inference thresholds."""
    x = synthetic(n=4096, d=32)
    cfg = TrainConfig(sae=SAEConfig(d_sae=128, k=4, sparsity=sparsity),
                      data=DataOptions(batch_size=512, fill_tokens=4096, total_tokens=512 * 20),
                      optim=OptimOptions(lr=3e-3, warmup_steps=5), run=RunOptions(progress=False))
    sae = train_sae(x, cfg)
    assert not sae.training
    saved = {k: v.clone() for k, v in sae.sparsifier.state_dict().items()}
    for mode in (False, True):
        sae.train(mode)
        sae.encode(x[:1])
        sae.encode(x[:512] * 3)
        sae(x[:64])
    for k, v in sae.sparsifier.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_with_model_gradients_equals_topk_at_beta_zero_and_differs_at_large_beta():
    """The g-SAE's with-gradient score: β = 0 must give exactly the TopK figures on the same
    positions; a large β changes the selection, so the spliced loss moves."""
    import saekit
    from saekit import data
    from saekit.splice import with_model_gradients

    model = saekit.load_model()
    packed = data.pack(data.documents(None, 3, "heldout"), model.tokenizer, 24)
    tokens = torch.stack([s for s, _ in zip(packed, range(6))])
    res = {}
    for beta in (0.0, 50.0):
        sae = SAE(SAEConfig(d_in=128, d_sae=256, k=4, sparsity="gtopk", hook_name="blocks.3.attn.hook_z",
                            hook_shape=(4, 32), variant=VariantOptions(beta=beta)), seed=0).eval()
        res[beta] = with_model_gradients(model, sae, tokens, batch_size=4)
    assert res[0.0]["ce_loss_sae_topk_last"] == res[0.0]["ce_loss_sae_with_grads_last"]
    assert res[50.0]["ce_loss_sae_topk_last"] == res[0.0]["ce_loss_sae_topk_last"]
    assert res[50.0]["ce_loss_sae_with_grads_last"] != res[50.0]["ce_loss_sae_topk_last"]
    assert res[0.0]["positions"] == 6 and res[0.0]["ce_loss_clean_last"] > 0


@pytest.mark.parametrize("sparsity", ["mutual_choice", "batchtopk", "matryoshka", "feature_choice"])
def test_batch_level_selections_start_below_an_fvu_of_one_at_wide_widths(sparsity):
    """A batch-level selection lets one token take many latents at the start. With Gao et
    al.'s unit encoder rows that reconstruction overshoots (this batch: FVU ≈ 9); the
    BatchTopK code's smaller encoder (``batch_level_init_norm``) starts below 1."""
    from saekit.sae import batch_level_init_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g) * torch.rand(2048, 1, generator=g).add(0.75)  # norms spread ~2x, like hook_z
    sae = sae_of(sparsity, d_in=32, d_sae=1024, k=8)
    assert torch.allclose(sae.W_enc_T.norm(dim=1), torch.full((1024,), batch_level_init_norm(32, 1024)))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        x_hat = sae.train()(x).x_hat
    assert (x - x_hat).pow(2).sum() / total_variance(x) < 1
    assert sae_of("topk", d_in=32, d_sae=1024).W_enc_T.norm(dim=1).sub(1).abs().max() < 1e-5  # TopK keeps Gao et al.'s
