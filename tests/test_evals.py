"""saekit.evals: metric functions on hand-computed cases, supervised dictionaries and the three
axes on synthetic data with known answers, and `saekit eval` / `saekit eval-ioi` end to end."""

import json
import math

import pytest
import torch

from saekit.cli import main
from saekit.evals import axes
from saekit.evals.nodes import Node, Readout
from saekit.evals.supervised import SupervisedDictionary
from saekit.metrics import frequency_summary, fvu, l0_per_token, loss_recovered, next_token_loss
from saekit.models import model_name
from saekit.sae import SAE, SAEConfig
from saekit.splice import ce_losses
from saekit.types import ELEMENTWISE
from tests.arch_helpers import ARCHITECTURES, as_if_trained_

HOOK = "blocks.3.attn.hook_z"


# ---- standard metrics -------------------------------------------------------------------------

def test_metric_functions_match_hand_computed_values():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1); Σ‖x − mean‖² = 4
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0]])  # squared error 1
    assert fvu(x, x_hat) == pytest.approx(0.25)
    assert l0_per_token(torch.tensor([[0.0, 2.0, 0.5], [0.0, 0.0, 0.0]])).tolist() == [2, 0]
    assert loss_recovered(clean=2.0, spliced=2.5, ablated=4.0) == pytest.approx(0.75)
    assert math.isnan(loss_recovered(clean=2.0, spliced=2.5, ablated=2.0))  # the ablation changes nothing
    s = frequency_summary(torch.tensor([0, 5, 50, 1]), n_tokens=100)
    assert s["never_fired_frac"] == pytest.approx(0.25)  # one latent of four never fired
    assert s["dense_frac"] == pytest.approx(0.25)  # one fires on 50% > 10%
    assert sum(s["log10_freq_hist"]["counts"]) == 3  # the three live latents


def _identity_sae(d_in: int, hook_shape) -> SAE:
    """Latents ReLU(x) and ReLU(−x) with k = d_in: TopK keeps exactly the non-negative half,
    so the reconstruction relu(x) − relu(−x) is x itself."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=2 * d_in, k=d_in, hook_name=HOOK, hook_shape=hook_shape))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_(), sae.b_dec.zero_()
    return sae.eval()


def test_ce_recovered_is_one_for_a_perfect_reconstruction_and_zero_for_the_ablation(model):
    from saekit import data

    shape = (model.cfg.n_heads, model.cfg.d_head)
    packed = data.pack(data.documents(None, 5, "heldout"), model.tokenizer, 32)
    tokens = torch.stack([s for s, _ in zip(packed, range(4))])
    perfect = ce_losses(model, _identity_sae(math.prod(shape), shape), tokens)
    assert perfect.recovered_zero_keep_bos == pytest.approx(1.0, abs=1e-4)
    assert perfect.recovered_zero_all == pytest.approx(1.0, abs=1e-4)
    assert perfect.kl == pytest.approx(0.0, abs=1e-5)
    zero = _identity_sae(math.prod(shape), shape)
    with torch.no_grad():
        zero.W_dec.zero_()
    ce = ce_losses(model, zero, tokens)
    assert ce.recovered_zero_keep_bos == pytest.approx(0.0, abs=1e-6)
    # Kissane et al.'s baseline zeroes BOS too: a different loss, so the splice that keeps
    # BOS is not "nothing recovered" against it
    with torch.no_grad():
        z = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook=None: torch.zeros_like(a))])
    assert ce.zero_all == pytest.approx(next_token_loss(z, tokens).item(), rel=1e-5)
    assert ce.zero_all != ce.zero_keep_bos and ce.recovered_zero_all != 0
    mean = torch.randn(shape)
    with torch.no_grad():
        zero.b_dec.copy_(mean.flatten())  # outputs exactly the mean: the mean ablation itself
    assert ce_losses(model, zero, tokens, mean=mean).recovered_mean == pytest.approx(0.0, abs=1e-6)


# ---- supervised dictionaries on synthetic activations --------------------------------------------

def _synthetic(d=16, seed=0):
    """Every combination of 3 io values × 3 s values × 2 pos values, twice: activations built
    additively as ``c + v_io + v_s + v_pos`` from known random vectors."""
    g = torch.Generator().manual_seed(seed)
    vec = {"io": torch.randn(3, d, generator=g), "s": torch.randn(3, d, generator=g),
           "pos": torch.randn(2, d, generator=g)}
    c = torch.randn(d, generator=g)
    grid = torch.cartesian_prod(torch.arange(3), torch.arange(3), torch.arange(2)).repeat(2, 1)
    labels = {"io": grid[:, 0], "s": grid[:, 1], "pos": grid[:, 2]}
    acts = c + sum(vec[a][labels[a]] for a in vec)
    values = {"io": ["A", "B", "C"], "s": ["A", "B", "C"], "pos": ["ABB", "BAB"]}
    return acts, labels, values


@pytest.mark.parametrize("method", ["mean", "lstsq"])
def test_supervised_dictionary_reconstructs_additive_activations_exactly(method):
    acts, labels, values = _synthetic()
    sup = SupervisedDictionary.fit(acts, labels, values, method)
    assert torch.allclose(sup.reconstruct(labels), acts, atol=1e-4)


def test_supervised_edit_moves_exactly_to_the_counterfactual_activation(tmp_path):
    acts, labels, values = _synthetic()
    sup = SupervisedDictionary.fit(acts, labels, values, "mean")
    new_io = (labels["io"] + 1) % 3
    cf_labels = {**labels, "io": new_io}
    # the counterfactual prompt's activation, from the same additive model
    cf = acts[[next(j for j in range(len(acts)) if all(cf_labels[a][i] == labels[a][j] for a in labels))
               for i in range(len(acts))]]
    assert torch.allclose(sup.edit(acts, "io", labels["io"], new_io), cf, atol=1e-4)
    sup.save(tmp_path / "d.safetensors")
    back = SupervisedDictionary.load(tmp_path / "d.safetensors")
    assert back.values == values and torch.equal(back.U["io"], sup.U["io"])


def test_f1_of_a_latent_firing_exactly_on_one_value_is_one():
    labels = torch.tensor([0, 1, 2, 1, 0, 1])
    active = torch.stack([labels == 1, torch.ones(6, dtype=torch.bool)], 1)  # latent 0 = value 1
    precision, recall, f1 = axes.f1_table(active, labels, 3)
    assert f1[0, 1] == 1.0 and f1[0, 0] == 0.0
    assert precision[1, 1] == pytest.approx(0.5) and recall[1, 1] == 1.0  # always-on latent
    r = axes.interpretability(active, {"io": labels}, active, {"io": labels}, {"io": ["a", "b", "c"]})["io"]
    assert r["best_f1"]["b"] == 1.0 and r["coverage"] == pytest.approx(1 / 3)


def test_oversplitting_counts_a_value_split_over_precise_latents():
    labels = torch.tensor([1] * 10 + [0] * 10)
    a = torch.zeros(20, 3, dtype=torch.bool)
    a[:5, 0] = True  # half of value 1, precisely
    a[5:10, 1] = True  # the other half
    a[:, 2] = True  # an always-on latent changes nothing
    assert axes.oversplitting(a, labels, a, labels, 2) == 1
    a[15, 1] = True  # now latent 1 is imprecise (5/6 < 0.9)
    assert axes.oversplitting(a, labels, a, labels, 2) == 0


def test_approximation_ratios_on_a_toy_readout():
    a = torch.randn(50, 4)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    run = lambda v: Readout((v @ w) ** 2, torch.zeros(len(v), dtype=torch.long))  # noqa: E731
    mean = a.mean(0).expand_as(a)
    base = (((a @ w) ** 2).mean().item(), ((a.mean(0) @ w) ** 2).item())
    exact = axes.approximation(run, a, a_hat=a, explained=a - mean, base=base)
    assert exact["sufficiency"] == pytest.approx(1.0) and exact["necessity"] == pytest.approx(1.0)
    nothing = axes.approximation(run, a, a_hat=mean, explained=torch.zeros_like(a), base=base)
    assert nothing["sufficiency"] == pytest.approx(0.0, abs=1e-6) and nothing["necessity"] == pytest.approx(0.0)


def test_agnostic_edit_reaches_a_target_made_of_latent_moves():
    torch.manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    f = torch.zeros(5, 32)
    f[:, 3] = 2.0
    f_cf = f.clone()
    f_cf[:, 3], f_cf[:, 7] = 0.0, 1.5  # the counterfactual swaps latent 3 for latent 7
    target = (f_cf - f) @ D
    edits = axes.agnostic_edits(f, f_cf, D, target)
    assert torch.allclose(edits[2][0], target, atol=1e-5)
    assert torch.allclose(edits[2][1], 2.0 * D[3].expand(5, -1), atol=1e-5)  # removed: 2·d_3


def test_node_names_parse_and_bad_ones_get_one_line_errors():
    from saekit.errors import ConfigError

    assert Node.parse("L3H1.s2", 6, 4) == Node(3, "s2", 1)
    assert Node.parse("l5.END", 6, 4).name == "L5.END"
    for bad in ("L9.END", "L3H7.END", "layer3"):
        with pytest.raises(ConfigError):
            Node.parse(bad, 6, 4)


# ---- end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_sae(tmp_path_factory, model, request):
    """A seeded random hook_z SAE of the architecture ``request.param`` (default topk), saved."""
    sparsity = getattr(request, "param", "topk")
    shape = (model.cfg.n_heads, model.cfg.d_head)
    sae = SAE(SAEConfig(d_in=math.prod(shape), d_sae=256, k=8, hook_name=HOOK, model_name=model_name(model),
                        hook_shape=shape, sparsity=sparsity), seed=0)
    path = tmp_path_factory.mktemp(sparsity) / "small"
    as_if_trained_(sae).save(path)
    return path


@pytest.mark.parametrize("small_sae", ARCHITECTURES, indirect=True)
def test_saekit_eval_end_to_end(small_sae, capsys):
    assert main(["eval", "--sae", str(small_sae), "--tokens", "2048", "--seq-len", "64"]) == 0
    r = json.loads((small_sae / "eval.json").read_text())
    sparsity = r["sparsity"]
    assert sparsity == json.loads((small_sae / "cfg.json").read_text())["sparsity"]
    if sparsity in ("topk", "gtopk"):
        assert r["l0"] == pytest.approx(8.0) and r["k"] == 8
    else:  # a measured L0; k is reported only where the architecture selects k a token
        assert 0 < r["l0"] < 256 and r["k"] == (None if sparsity in ELEMENTWISE else 8)
    assert 0 <= r["never_fired_frac"] <= 1 and r["tokens"] == 32 * 63 and -1 < r["explained_variance"] <= 1
    assert "dead_frac" not in r  # the training counters' name; eval.json measures never-fired
    assert r["ce_loss_zero_ablation_keep_bos"] > r["ce_loss_clean"] and r["eval_split"].startswith("saekit corpus")
    html = (small_sae / "eval.html").read_text()
    assert "Firing frequency" in html and (small_sae / "plotly.min.js").exists()
    assert ("k=8" in html) == (sparsity not in ELEMENTWISE) and "k=None" not in html
    assert "explained variance" in capsys.readouterr().out


# eval-ioi of a random dense SAE (standard: ~half the latents fire) ran past 4 minutes unfinished
# on the 2 shared cores: only TopK here until that is measured and sped up (see the issue)
@pytest.mark.parametrize("small_sae", ["topk"], indirect=True)
def test_saekit_eval_ioi_end_to_end(small_sae, capsys):
    argv = ["eval-ioi", "--sae", str(small_sae), "--n", "40", "--n-fit", "80", "--n-table", "20",
            "--node", "L3.END", "L3H3.END"]
    assert main(argv) == 0
    r = json.loads((small_sae / "ioi_eval.json").read_text())
    assert set(r["nodes"]) == {"L3.END", "L3H3.END"}
    node = r["nodes"]["L3.END"]
    assert set(node["saes"]) == {"small"} and "selection" not in node["saes"]["small"]  # TopK: one block
    for kind, per in node["saes"]["small"]["control"]["io"].items():
        assert set(per) == {"2", "4", "8", "16"}  # budgets in latents changed, the same for both edits
        assert all(0 < row["latents_changed"] <= int(b) for b, row in per.items()), kind
    sparsity = json.loads((small_sae / "cfg.json").read_text())["sparsity"]
    assert node["saes"]["small"]["l0"] == pytest.approx(8.0) if sparsity == "topk" else node["saes"]["small"]["l0"] > 0
    # layer 3 at END is the embedded model's main IOI node: mean-ablating it costs most of the LD
    ap = node["supervised"]["mean"]["approximation"]
    assert ap["ld_mean_ablation"] < 0.5 * ap["ld_clean"] and math.isfinite(ap["sufficiency"])
    assert (small_sae / "ioi_dictionaries" / "L3H3.END.mean.safetensors").exists()
    assert "edit accuracy" in (small_sae / "ioi_eval.html").read_text()
    assert "sufficiency" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["eval-ioi", "--node", "L9.END"], "outside this model"),
    (["eval-ioi", "--node", "L2.END"], "the SAE reads layer 3"),
    (["eval-ioi", "--node", "nonsense"], "unknown node"),
    (["eval-ioi", "--model", "gpt2"], "trained on 'saekit-ioi-6l'"),
    (["eval", "--tokens", "10"], "--tokens"),
])
def test_eval_bad_input_is_one_line_exit_2(small_sae, argv, message, capsys):
    assert main([*argv[:1], "--sae", str(small_sae), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_eval_of_a_residual_sae_or_missing_folder_is_refused(tmp_path, model, capsys):
    sae = SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=64, k=4, hook_name="blocks.3.hook_resid_post",
                        model_name=model_name(model)))
    sae.save(tmp_path / "resid")
    assert main(["eval-ioi", "--sae", str(tmp_path / "resid"), "--n", "10", "--n-fit", "10", "--n-table", "10"]) == 2
    assert "hook_z" in capsys.readouterr().err
    assert main(["eval", "--sae", str(tmp_path / "nothing")]) == 2
    assert "no SAE folder" in capsys.readouterr().err
    other = SAE(SAEConfig(d_in=7, d_sae=16, k=2, hook_name=HOOK, model_name=model_name(model)))
    other.save(tmp_path / "other")
    assert main(["eval", "--sae", str(tmp_path / "other")]) == 2
    assert "d_in=7" in capsys.readouterr().err


# ---- IOI data ---------------------------------------------------------------------------------------

def test_counterfactuals_change_one_attribute_and_keep_positions(model):
    from saekit.evals import ioi_data as D

    setup = D.setup_for(model)
    assert setup.templates == __import__("saekit").corpus.HELDOUT_TEMPLATES  # embedded: held-out ones
    prompts = D.eval_prompts(setup, 30, seed=3)
    base = D.encode(model.tokenizer, prompts, setup)
    assert {p.io for p in prompts} | {p.s for p in prompts} <= set(setup.eval_names)
    assert torch.equal(base.tokens[torch.arange(30), base.s2], base.s_tok)
    for attr in D.ATTRIBUTES:
        cf = D.encode(model.tokenizer, D.counterfactuals(prompts, attr, setup, seed=3), setup)
        assert torch.equal(cf.end, base.end) and torch.equal(cf.s2, base.s2)
        changed = [a for a in D.ATTRIBUTES if not torch.equal(cf.labels[a], base.labels[a])]
        assert changed == [attr]
        if attr != "pos":  # new names come from the counterfactual half only
            new = {p.io if attr == "io" else p.s for p in cf.prompts}
            assert new <= set(setup.cf_names)


def test_ioi_dataset_source_yields_completed_prompts():
    import itertools

    from saekit import corpus, data

    docs = list(itertools.islice(data.documents("ioi", seed=1), 20))
    assert docs == list(itertools.islice(data.documents("ioi", seed=1), 20))  # deterministic
    for d in docs:
        answer = d.rsplit(" ", 1)[1].rstrip(".")
        words = d.replace(".", " ").replace(",", " ").split()
        assert answer in corpus.NAMES and words.count(answer) == 2  # IO: in the clause and as answer


def test_reports_share_the_plotly_script_of_the_folder_above(tmp_path):
    """pretrained/saes/ keeps one plotly.min.js for all its SAE folders: a report finds it one
    level up and writes no copy; a lone folder gets its own."""
    from saekit.evals.report import PLOTLY_JS, write_report
    lone = tmp_path / "lone"
    lone.mkdir()
    write_report(lone / "eval.html", "t", ["<p>x</p>"])
    assert (lone / PLOTLY_JS).exists() and f"src='{PLOTLY_JS}'" in (lone / "eval.html").read_text()
    (tmp_path / PLOTLY_JS).write_text("shared")
    (tmp_path / "a").mkdir()
    write_report(tmp_path / "a" / "eval.html", "t", ["<p>x</p>"])
    assert not (tmp_path / "a" / PLOTLY_JS).exists()
    assert f"src='../{PLOTLY_JS}'" in (tmp_path / "a" / "eval.html").read_text()


def test_shipped_reports_load_a_plotly_script_that_is_there():
    """Every shipped report names a plotly.min.js that exists, and pretrained/ keeps one copy."""
    from pathlib import Path
    saes = Path(__file__).resolve().parents[1] / "pretrained" / "saes"
    pages = sorted(saes.glob("*/*.html"))
    assert pages
    for page in pages:
        src = page.read_text().split("<script src='", 1)[1].split("'", 1)[0]
        assert (page.parent / src).exists(), f"{page} loads {src}, which is missing"
    assert len(list(saes.rglob("plotly.min.js"))) == 1
