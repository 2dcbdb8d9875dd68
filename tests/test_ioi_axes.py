"""The IOI control and interpretability axes: edit budgets matched in latents changed,
interpretations chosen on the fit prompts and reported on the evaluation prompts, and
g-SAEs scored with and without model-target gradients."""

from types import SimpleNamespace

import pytest
import torch

from saekit.evals import axes
from saekit.evals.nodes import Readout
from saekit.sae import SAE, SAEConfig
from tests.arch_helpers import ARCHITECTURES

HOOK = "blocks.3.attn.hook_z"


# ---- item: edit budgets ----------------------------------------------------------------------

def _edit_case(n=3, d_sae=40):
    """Codes with 16 latents active on the clean prompts (0..15) and 16 others on the
    counterfactuals (16..31), every one with a positive F1 for its value; D = identity, so a
    latent changed is a nonzero coordinate of the edit."""
    g = torch.Generator().manual_seed(0)
    f = torch.zeros(n, d_sae)
    f_cf = torch.zeros(n, d_sae)
    f[:, :16] = 1 + torch.rand(n, 16, generator=g)
    f_cf[:, 16:32] = 1 + torch.rand(n, 16, generator=g)
    D = torch.eye(d_sae)
    f1_old = torch.rand(n, d_sae, generator=g) * 0.9 + 0.05
    f1_new = torch.rand(n, d_sae, generator=g) * 0.9 + 0.05
    return f, f_cf, D, f1_old, f1_new


def test_both_edits_change_exactly_the_budgeted_number_of_latents():
    f, f_cf, D, f1_old, f1_new = _edit_case()
    target = (f_cf - f) @ D
    agnostic = axes.agnostic_edits(f, f_cf, D, target)
    assert set(agnostic) == set(axes.BUDGETS)
    for b in axes.BUDGETS:
        aware = axes.aware_edit(f, f_cf, D, f1_old, f1_new, b)
        # D = I: the edit in latent coordinates is the edit itself
        assert (aware[0] != 0).sum(1).tolist() == [b] * len(f), f"aware edit at budget {b}"
        assert (agnostic[b][0] != 0).sum(1).tolist() == [b] * len(f), f"agnostic edit at budget {b}"
        assert aware.changed.tolist() == [b] * len(f) and agnostic[b].changed.tolist() == [b] * len(f)
        # the aware edit is half removals of clean latents, half additions of counterfactual ones
        assert (aware[0][:, :16] < 0).sum(1).tolist() == [b // 2] * len(f)
        assert (aware[0][:, 16:32] > 0).sum(1).tolist() == [b // 2] * len(f)


def test_aware_edit_refuses_an_odd_budget():
    f, f_cf, D, f1_old, f1_new = _edit_case()
    with pytest.raises(ValueError, match="even"):
        axes.aware_edit(f, f_cf, D, f1_old, f1_new, 3)


def test_changed_counts_latents_not_moves_when_too_few_are_active():
    f, f_cf, D, f1_old, f1_new = _edit_case()
    f[:, 2:16] = 0  # two clean latents left to remove
    aware = axes.aware_edit(f, f_cf, D, f1_old, f1_new, 8)
    assert aware.changed.tolist() == [2 + 4] * len(f)


# ---- item: interpretations chosen on fit prompts, reported on evaluation prompts -------------

def _rows(n, on):
    t = torch.zeros(n)
    t[on] = 1.0
    return t


def _hand_built_case(sparsity="topk"):
    """Four latents, eight fit and eight evaluation prompts; io = a on rows 0-3, b on 4-7.

    Fit: latent 0 fires exactly on a (F1 1), latent 1 on three of the four a rows (F1 0.86);
    latents 2 and 3 split b in halves (each precision 1, recall 0.5, union 1: over-split).
    Eval: latent 0 fires on two a rows and two b rows (F1 0.5), latent 1 exactly on a (F1 1);
    latents 2 and 3 fire on the same half of b (union recall 0.5: not over-split)."""
    fit = torch.stack([_rows(8, [0, 1, 2, 3]), _rows(8, [0, 1, 2]), _rows(8, [4, 5]), _rows(8, [6, 7])], 1)
    ev = torch.stack([_rows(8, [0, 1, 4, 5]), _rows(8, [0, 1, 2, 3]), _rows(8, [4, 5]), _rows(8, [4, 5])], 1)
    io = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    labels = {"io": io, "s": 1 - io, "pos": torch.tensor([0, 1] * 4)}
    values = {"io": ["a", "b"], "s": ["a", "b"], "pos": ["ABB", "BAB"]}
    sae = SAE(SAEConfig(d_in=4, d_sae=4, k=4, hook_name=HOOK, sparsity=sparsity))
    # codes = ReLU(x), the hand-built rows themselves, for every architecture: k = d_sae, zero
    # inference thresholds, JumpReLU's θ = 1e-3 below the rows' 1s, Gated's r_mag = b_mag = 0
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4)), sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae.eval(), fit, ev, labels, values


@pytest.mark.parametrize("sparsity", ARCHITECTURES)
def test_reported_f1_is_the_fit_chosen_latents_f1_on_the_evaluation_prompts(sparsity):
    from saekit.evals.ioi_eval import eval_sae_at_node

    sae, fit, ev, labels, values = _hand_built_case(sparsity)
    assert torch.equal(sae.encode_dense(ev), ev)  # the architecture's own encoder: codes = the rows
    data = SimpleNamespace(labels=labels)
    p = SimpleNamespace(setup=SimpleNamespace(values=values), fit=data, eval=data,
                        cf={a: data for a in labels})
    x = {"fit": fit, "eval": ev}
    x_cf = {a: ev.roll(1, 0) for a in labels}
    run = lambda v: Readout(v.sum(1), torch.zeros(len(v), dtype=torch.long))  # noqa: E731
    truth = {a: torch.zeros(8, dtype=torch.long) for a in labels}
    r = eval_sae_at_node(axes.NodeSAE(sae, slice(None)), run, ev, x, x_cf, p, truth,
                         {a: 0.0 for a in labels}, {a: 1.0 for a in labels}, (1.0, 0.0))
    io = r["interpretability"]["io"]
    assert io["best_latent"]["a"] == 0  # chosen on the fit prompts (latent 1 wins on eval)
    assert io["best_f1"]["a"] == pytest.approx(0.5)  # reported on the evaluation prompts
    assert io["fit_f1"]["a"] == pytest.approx(1.0)
    assert io["best_precision"]["a"] == pytest.approx(0.5) and io["best_recall"]["a"] == pytest.approx(0.5)
    assert io["best_latent"]["b"] == 2 and io["best_f1"]["b"] == pytest.approx(2 / 3, abs=1e-4)
    assert io["mean_best_f1"] == pytest.approx((0.5 + 2 / 3) / 2, abs=1e-4)
    assert r["oversplitting"]["io"] == 0  # the fit prompts' split does not hold on eval
    hm = r["f1_heatmaps"]["io"]
    assert hm["f1"][hm["latents"].index(0)][hm["values"].index("a")] == pytest.approx(0.5)


def test_oversplitting_picks_the_split_on_fit_and_measures_it_on_eval():
    _, fit, ev, labels, _ = _hand_built_case()
    io = labels["io"]
    assert axes.oversplitting(fit > 0, io, fit > 0, io, 2) == 1
    assert axes.oversplitting(fit > 0, io, ev > 0, io, 2) == 0
    # a split that only exists on eval is not found: its latents are not chosen on fit
    whole = fit.clone()
    whole[4:, 2:] = 1.0  # on these fit prompts latents 2 and 3 each cover all of b
    assert axes.oversplitting(whole > 0, io, fit > 0, io, 2) == 0


# ---- item: g-SAEs with and without gradients -------------------------------------------------

@pytest.fixture(scope="module")
def prepared(model):
    from saekit.evals.ioi_eval import prepare
    from saekit.evals.options import IOIEvalOptions

    return prepare(model, IOIEvalOptions(n=24, n_fit=48, n_table=10))


def test_model_target_gradients_ignore_padding_and_the_answer(model, prepared):
    from saekit.activations import activation_and_grad, resolve_hook
    from saekit.evals.ioi_eval import layer_grads

    data = prepared.eval
    g = layer_grads(model, data, 3, "end")
    assert g.shape == (len(data), model.cfg.n_heads * model.cfg.d_head) and g.abs().sum() > 0
    hook = resolve_hook(model, HOOK)
    short = int(data.end.argmin())
    e = int(data.end[short])
    for i in (short, int(data.end.argmax())):
        # alone, with one token after END (the IO answer itself: its logits are not scored)
        alone = torch.cat([data.tokens[i, : data.end[i] + 1], data.io_tok[i: i + 1]])[None]
        _, gi = activation_and_grad(model, alone, hook, targets="model")
        assert torch.allclose(g[i], gi[0, data.end[i]].flatten().float(), atol=1e-5, rtol=1e-4)
    assert e < data.tokens.shape[1] - 1  # the short prompt is padded in the batch, yet unaffected


def test_gtopk_sae_is_scored_both_without_and_with_model_target_gradients(model, prepared):
    from saekit.evals.ioi_eval import GRAD_SUFFIX, eval_node
    from saekit.evals.nodes import Node
    from saekit.types import VariantOptions

    d_in = model.cfg.n_heads * model.cfg.d_head
    cfg = dict(d_in=d_in, d_sae=128, k=4, hook_name=HOOK, hook_shape=(model.cfg.n_heads, model.cfg.d_head))
    g_sae = SAE(SAEConfig(**cfg, sparsity="gtopk", variant=VariantOptions(beta=50.0)), seed=0).eval()
    plain = SAE(SAEConfig(**cfg), seed=0).eval()
    r = eval_node(model, Node(3, "end"), prepared, {"g": g_sae})
    assert set(r["saes"]) == {"g", "g" + GRAD_SUFFIX}
    without, with_ = r["saes"]["g"], r["saes"]["g" + GRAD_SUFFIX]
    assert "without gradients" in without["selection"] and "model's own predictions" in with_["selection"]
    # without gradients the g-SAE is exactly TopK: a TopK SAE of the same weights, by hand
    x = prepared.acts(model, "eval", 3, "end")
    x_hat = plain.decode(plain.encode(x)).detach()
    assert without["fvu"] == pytest.approx(((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-4)
    assert with_["l0"] == pytest.approx(4.0)
    # at beta = 50 the gradients change which latents are kept
    assert with_["fvu"] != pytest.approx(without["fvu"])
    assert with_["interpretability"] != without["interpretability"]

