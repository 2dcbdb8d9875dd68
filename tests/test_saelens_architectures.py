"""SAELens folders of every architecture saekit loads (standard, jumprelu, gated, topk and
BatchTopK / Matryoshka training checkpoints), in v6 and v5 layouts, and SAE.save(format="saelens")
of every saekit architecture. The expected outputs are SAELens's formulas written out here
(v6 ``sae_lens/saes/{standard,jumprelu,gated,topk,batchtopk}_sae.py`` and ``sae.py``, v5
``sae_lens/sae.py``), on tiny hand-made folders; CI cannot run SAELens itself
(benchmarks/saelens_check.py does, docs/formats.md has its table)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit import SAE, SAEConfig, load_sae
from saekit.errors import SAEFileError
from saekit.types import VariantOptions

D_IN, D_SAE, K = 8, 32, 4
X = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))
TENSORS = {"standard": ("W_enc", "b_enc", "W_dec", "b_dec"), "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
           "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
           "gated": ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"),
           "batchtopk": ("W_enc", "b_enc", "W_dec", "b_dec", "topk_threshold")}


def weights(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g),
         "W_dec": torch.randn(D_SAE, D_IN, generator=g) * (torch.rand(D_SAE, 1, generator=g) * 3 + 0.2),
         "b_dec": torch.randn(D_IN, generator=g),
         # some negative: SAELens's ReLU(p)·1[p > t] then differs from p·1[p > t]
         "threshold": torch.rand(D_SAE, generator=g) * 3 - 0.5, "topk_threshold": torch.tensor(1.5),
         "b_gate": torch.randn(D_SAE, generator=g), "b_mag": torch.randn(D_SAE, generator=g),
         "r_mag": torch.randn(D_SAE, generator=g) * 0.5}
    return {n: w[n] for n in TENSORS["batchtopk" if arch == "matryoshka_batchtopk" else arch]}


def saelens(x, w, arch, apply_b_dec=True, rescale=False, scale=None, ft_scale=None):
    """SAELens's inference function of ``arch``, written plainly: (feature_acts, reconstruction).
    A batchtopk checkpoint runs as SAELens's inference save of it runs: JumpReLU at topk_threshold
    on the (rescaled) pre-activations."""
    s = 1.0 if scale is None else scale
    u = s * x - (w["b_dec"] if apply_b_dec else 0)
    norms = w["W_dec"].norm(dim=-1)
    if arch == "gated":
        gate = (u @ w["W_enc"] + w["b_gate"] > 0).float()
        f = gate * (u @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]).relu()
    else:
        pre = u @ w["W_enc"] + w["b_enc"]
        pre = pre * norms if rescale else pre
        if arch == "standard":
            f = pre.relu()
        elif arch == "jumprelu":
            f = pre.relu() * (pre > w["threshold"])
        elif arch == "topk":
            vals, idx = pre.topk(K, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        else:  # batchtopk, matryoshka_batchtopk
            f = pre.relu() * (pre > w["topk_threshold"])
    g = f / norms if rescale else f
    g = g * ft_scale if ft_scale is not None else g
    return f, (g @ w["W_dec"] + w["b_dec"]) / s


def write(folder, w, arch, layout="v6", extra_files=None, **settings):
    """A SAELens folder: v6 (settings at the top, names in metadata) or v5 (all at the top level)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, folder / "sae_weights.safetensors")
    names = {"hook_name": "blocks.0.hook_resid_pre", "model_name": "gpt2"}
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, **({"k": K} if arch == "topk" else {})}
    if layout == "v6":
        cfg.update(normalize_activations="none", reshape_activations="none",
                   metadata={**names, "sae_lens_version": "6.54.12"})
    else:  # pre-6: activation_fn_str, a boolean normalize_activations, names at the top level
        cfg.update(names, normalize_activations=False, activation_fn_str="topk" if arch == "topk" else "relu",
                   activation_fn_kwargs={"k": K} if arch == "topk" else {}, finetuning_scaling_factor=False,
                   sae_lens_training_version="5.9.1")
        if arch == "topk":
            cfg.update(architecture="standard")
            del cfg["k"]
    cfg.update(settings)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return folder


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


def assert_same(sae, ref):
    f, x_hat = ref
    close(sae.encode_dense(X), f)
    close(sae(X).x_hat, x_hat)


ARCHS = ["standard", "jumprelu", "gated", "topk"]


@pytest.mark.parametrize("layout", ["v6", "v5"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_loads_with_saelens_function(tmp_path, arch, layout):
    w = weights(arch)
    sae = load_sae(write(tmp_path / "s", w, arch, layout))
    assert sae.cfg.sparsity == arch and sae.cfg.hook_name == "blocks.0.hook_resid_pre" and sae.cfg.model_name == "gpt2"
    assert_same(sae, saelens(X, w, arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_b_dec_to_input_false_is_folded_for_every_architecture(tmp_path, arch):
    w = weights(arch, seed=2)
    assert_same(load_sae(write(tmp_path / "s", w, arch, apply_b_dec_to_input=False)),
                saelens(X, w, arch, apply_b_dec=False))


@pytest.mark.parametrize("arch", ARCHS)
def test_expected_average_only_in_with_its_factor_is_folded_for_every_architecture(tmp_path, arch):
    w, s = weights(arch, seed=3), 0.37
    folder = write(tmp_path / "s", w, arch, normalize_activations="expected_average_only_in",
                   apply_b_dec_to_input=False,
                   extra_files={"activation_scaler.json": json.dumps({"scaling_factor": s})})
    assert_same(load_sae(folder), saelens(X, w, arch, apply_b_dec=False, scale=s))


@pytest.mark.parametrize("arch", ARCHS)
def test_v5_finetuning_scaling_factor_is_folded_for_every_architecture(tmp_path, arch):
    w = weights(arch, seed=4)
    phi = torch.rand(D_SAE, generator=torch.Generator().manual_seed(5)) + 0.5
    folder = write(tmp_path / "s", {**w, "scaling_factor": phi}, arch, "v5", finetuning_scaling_factor=True)
    assert_same(load_sae(folder), saelens(X, w, arch, ft_scale=phi))


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_rescale_acts_by_decoder_norm_is_ignored_outside_topk_as_saelens_ignores_it(tmp_path, arch):
    """Only SAELens's TopK configs have the field; from_dict drops it for the others."""
    w = weights(arch, seed=6)
    assert_same(load_sae(write(tmp_path / "s", w, arch, rescale_acts_by_decoder_norm=True)), saelens(X, w, arch))


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize("rescale", [None, True, False])
def test_batchtopk_training_checkpoints_load_as_saelens_saves_them_for_inference(tmp_path, arch, rescale):
    """SAELens has no inference batchtopk class: save_inference_model writes jumprelu at
    topk_threshold, after folding the decoder norms (rescale_acts_by_decoder_norm, whose
    training default is true)."""
    w = weights(arch, seed=7)
    settings = {} if rescale is None else {"rescale_acts_by_decoder_norm": rescale}
    sae = load_sae(write(tmp_path / "s", w, arch, k=4.0, topk_threshold_lr=0.01, **settings))
    assert sae.cfg.sparsity == "jumprelu"
    assert_same(sae, saelens(X, w, arch, rescale=rescale is not False))


def test_hook_z_folder_with_d_head_records_the_heads(tmp_path):
    w = weights("standard")
    folder = write(tmp_path / "s", w, "standard", reshape_activations="hook_z", d_head=2,
                   metadata={"hook_name": "blocks.1.attn.hook_z", "model_name": "gpt2", "sae_lens_version": "6.1.0"})
    sae = load_sae(folder)
    assert sae.cfg.hook_name == "blocks.1.attn.hook_z" and sae.cfg.hook_shape == (4, 2)
    z = X.reshape(64, 4, 2)  # SAELens's hook_z reshape: "... n_heads d_head -> ... (n_heads d_head)"
    close(sae.unflatten_hook(sae(sae.flatten_hook(z)).x_hat), saelens(X, w, "standard")[1].reshape(64, 4, 2))


@pytest.mark.parametrize("arch, name", [("jumprelu", "threshold"), ("gated", "r_mag"), ("standard", "b_enc")])
def test_a_missing_tensor_is_named(tmp_path, arch, name):
    w = weights(arch)
    del w[name]
    with pytest.raises(SAEFileError, match=rf"^[^\n]*lacks \['{name}'\], which a SAELens {arch} SAE holds"):
        load_sae(write(tmp_path / "s", w, arch))


def test_shapes_that_disagree_with_cfg_json_are_named(tmp_path):
    w = weights("gated")
    w["b_mag"] = w["b_mag"][:-1]
    with pytest.raises(SAEFileError, match=r"^[^\n]*tensor b_mag has shape \(31,\), cfg.json implies \(32,\)"):
        load_sae(write(tmp_path / "s", w, "gated"))


# ---- saving every architecture as SAELens runs it ----------------------------------------------

SAVED = {"topk": "topk", "gtopk": "topk", "standard": "standard", "jumprelu": "jumprelu", "gated": "gated",
         "mutual_choice": "jumprelu", "batchtopk": "jumprelu", "matryoshka": "jumprelu",
         "feature_choice": "jumprelu"}


def random_sae(sparsity, seed=0):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, sparsity=sparsity, hook_name="blocks.0.hook_resid_pre",
                        model_name="gpt2"), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in sae.state_dict(keep_vars=True).items():
            if name == "W_dec":
                t.mul_(torch.rand(D_SAE, 1, generator=g) + 0.5)
            elif name in ("b_enc", "b_dec", "b_gate", "b_mag", "r_mag"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name in ("threshold", "sparsifier.theta"):
                t.copy_(torch.rand(t.shape, generator=g))
    return sae.eval()


@pytest.mark.parametrize("sparsity", list(SAVED))
def test_save_as_saelens_writes_what_saelens_runs_and_loads_back(tmp_path, sparsity):
    sae = random_sae(sparsity)
    sae.save(tmp_path / "s", format="saelens")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    w = load_file(tmp_path / "s" / "sae_weights.safetensors")
    arch = SAVED[sparsity]
    assert cfg["architecture"] == arch and set(w) == set(TENSORS[arch])
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_pre" and cfg["metadata"]["sae_lens_version"] >= "6"
    with torch.no_grad():
        out = sae(X)
        ref = saelens(X, w, arch, rescale=cfg.get("rescale_acts_by_decoder_norm", False))
        close(out.codes.dense(D_SAE), ref[0])
        close(out.x_hat, ref[1])
        again = load_sae(tmp_path / "s")
        close(again(X).x_hat, out.x_hat)
        close(again.encode_dense(X), ref[0])


def test_mutual_choice_in_batch_mode_cannot_be_saved_as_saelens(tmp_path):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, sparsity="mutual_choice", variant=VariantOptions(mc_mode="batch")))
    with pytest.raises(SAEFileError, match=r"^[^\n]*mc_mode='batch'"):
        sae.save(tmp_path / "s", format="saelens")
    assert not (tmp_path / "s" / "cfg.json").exists()
