"""SAELens folders: each setting of SAELens's TopK SAE that changes what it computes is either
honoured (the loaded saekit SAE gives SAELens's latents and reconstruction) or refused with a
one-line SAEFileError naming it. The expected outputs are SAELens's formulas written out here
(v6 ``sae_lens/saes/topk_sae.py`` and ``sae.py``; v5 ``sae_lens/sae.py`` for the fine-tuning
scale), on tiny hand-made folders."""

import json

import pytest
import torch
from safetensors.torch import save_file

from saekit import SAE, SAEConfig, load_sae
from saekit.errors import SAEFileError

D_IN, D_SAE, K = 8, 32, 4


def weights(seed=0, dec_scale=True):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g),
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    if dec_scale:  # decoder rows of unequal norms, so a norm-dependent setting shows
        w["W_dec"] *= torch.rand(D_SAE, 1, generator=g) * 3 + 0.2
    return w


def write(folder, w, extra_files=None, **cfg):
    """A SAELens 6 inference folder: cfg.json + sae_weights.safetensors (+ extra files)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, folder / "sae_weights.safetensors")
    base = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
            "metadata": {"hook_name": "blocks.0.hook_resid_pre", "model_name": "gpt2",
                         "sae_lens_version": "6.18.0"}}
    base.update(cfg)
    base = {k: v for k, v in base.items() if v is not None}
    (folder / "cfg.json").write_text(json.dumps(base))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return folder


def saelens(x, w, apply_b_dec_to_input=True, rescale=False, scale=None, ft_scale=None, k=K):
    """SAELens's TopK SAE, written plainly: (hidden_pre, feature_acts, reconstruction).

    ``scale`` is the expected_average_only_in factor s that SAELens's trainer and its
    ``fold_activation_norm_scaling_factor`` use (x in as s·x, x̂ out divided by s);
    ``ft_scale`` is v5's ``finetuning_scaling_factor`` (decode multiplies the features by it)."""
    s = 1.0 if scale is None else scale
    sae_in = s * x - (w["b_dec"] if apply_b_dec_to_input else 0)
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=-1)
    if rescale:
        hidden_pre = hidden_pre * norms
    vals, idx = hidden_pre.topk(k, dim=-1)
    f = torch.zeros_like(hidden_pre).scatter(-1, idx, vals.relu())
    g = f / norms if rescale else f
    if ft_scale is not None:
        g = g * ft_scale
    return hidden_pre, f, (g @ w["W_dec"] + w["b_dec"]) / s


def close(got, want):
    """Equal up to fp32 rounding: an absolute tolerance on the tensor's scale (x̂ sums cancel)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, want.abs().max().item()))


def assert_same_function(sae, x, ref):
    pre, f, x_hat = ref
    close(sae.pre_acts(x), pre)  # what the sparsifier ranks
    close(sae.encode_dense(x), f)  # so the same latents, with the same values
    close(sae(x).x_hat, x_hat)


X = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))


# ---- honoured settings ------------------------------------------------------------------------

def test_apply_b_dec_to_input_false_does_not_subtract_b_dec(tmp_path):
    w = weights()
    sae = load_sae(write(tmp_path / "s", w, apply_b_dec_to_input=False))
    assert_same_function(sae, X, saelens(X, w, apply_b_dec_to_input=False))


def test_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    w = weights()
    sae = load_sae(write(tmp_path / "s", w, rescale_acts_by_decoder_norm=True))
    assert_same_function(sae, X, saelens(X, w, rescale=True))
    # the selection ranks the rescaled pre-activations: another set of latents than without it
    assert not torch.equal(saelens(X, w, rescale=True)[1] > 0, saelens(X, w)[1] > 0)


def test_rescale_and_no_b_dec_together(tmp_path):
    w = weights(seed=3)
    sae = load_sae(write(tmp_path / "s", w, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False))
    assert_same_function(sae, X, saelens(X, w, apply_b_dec_to_input=False, rescale=True))


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_expected_average_only_in_with_the_v6_scaler_file_is_folded(tmp_path, apply_b_dec):
    w, s = weights(seed=4), 0.37
    folder = write(tmp_path / "s", w, normalize_activations="expected_average_only_in",
                   apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=True,
                   extra_files={"activation_scaler.json": json.dumps({"scaling_factor": s})})
    assert_same_function(load_sae(folder), X, saelens(X, w, apply_b_dec, rescale=True, scale=s))


def test_expected_average_only_in_with_the_v5_store_state_is_folded(tmp_path):
    w, s = weights(seed=5), 2.5
    folder = write(tmp_path / "s", w, normalize_activations=True, metadata=None,  # v5: a bool
                   hook_name="blocks.0.hook_resid_pre", model_name="gpt2")
    save_file({"estimated_norm_scaling_factor": torch.tensor(s), "n_dataset_processed": torch.tensor(3)},
              folder / "activations_store_state.safetensors")
    assert_same_function(load_sae(folder), X, saelens(X, w, scale=s))


def test_v5_topk_layout_and_finetuning_scaling_factor(tmp_path):
    w = weights(seed=6)
    phi = torch.rand(D_SAE, generator=torch.Generator().manual_seed(7)) + 0.5
    cfg = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "k": None, "finetuning_scaling_factor": True, "metadata": None,
           "hook_name": "blocks.0.hook_resid_pre", "model_name": "gpt2", "rescale_acts_by_decoder_norm": None}
    sae = load_sae(write(tmp_path / "s", {**w, "scaling_factor": phi}, **cfg))
    assert sae.cfg.hook_name == "blocks.0.hook_resid_pre"
    assert_same_function(sae, X, saelens(X, w, ft_scale=phi))


def test_a_scaling_factor_of_ones_is_dropped_as_saelens_does(tmp_path):
    w = weights(seed=8)
    sae = load_sae(write(tmp_path / "s", {**w, "scaling_factor": torch.ones(D_SAE)}))
    assert_same_function(sae, X, saelens(X, w))


def test_settings_are_honoured_on_saekit_written_saelens_folders_too(tmp_path):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K), seed=0)
    with torch.no_grad():
        sae.b_dec.normal_()
    sae.save(tmp_path / "s", format="saelens")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    w = {n: getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    assert_same_function(load_sae(tmp_path / "s"), X, saelens(X, w, apply_b_dec_to_input=False))


def test_saved_saelens_cfg_states_every_setting_saelens_reads(tmp_path):
    """SAELens's training config defaults rescale_acts_by_decoder_norm to true, and a cfg without
    sae_lens_version is read as a pre-6 one (dropping the nested metadata): the file must say both."""
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, hook_name="blocks.0.hook_resid_pre"), seed=0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # not unit rows: rescaling would change the result
        sae.b_dec.normal_()
    sae.save(tmp_path / "s", format="saelens")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["rescale_acts_by_decoder_norm"] is False and cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["architecture"] == "topk" and cfg["k"] == K
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    w = {n: getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    ref = saelens(X, w, cfg["apply_b_dec_to_input"], cfg["rescale_acts_by_decoder_norm"])
    close(sae(X).x_hat, ref[2])


# ---- refused settings -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, extra, names", [
    ({"normalize_activations": "layer_norm"}, {}, "normalize_activations='layer_norm'"),
    ({"normalize_activations": "constant_norm_rescale"}, {}, "normalize_activations='constant_norm_rescale'"),
    ({"normalize_activations": "l2"}, {}, "normalize_activations 'l2'"),
    ({"normalize_activations": "expected_average_only_in"}, {}, "normalize_activations='expected_average_only_in'"),
    ({"normalize_activations": "expected_average_only_in"},
     {"activation_scaler.json": '{"scaling_factor": -1}'}, "scaling_factor"),
    ({"hook_head_index": 2}, {}, "hook_head_index=2"),
    ({"architecture": "abstopk"}, {}, "architecture 'abstopk'"),
    ({"architecture": "transcoder"}, {}, "architecture 'transcoder'"),
    ({"architecture": "topk", "activation_fn_str": "relu"}, {}, "activation_fn 'relu'"),
    ({"architecture": "standard", "activation_fn_str": "tanh-relu", "k": None}, {}, "activation_fn 'tanh-relu'"),
    # v6 ignores activation_fn and would run this as ReLU; pre-6 (v5 test above) it is TopK
    ({"architecture": "standard", "activation_fn": "topk"}, {}, "architecture 'standard' with activation_fn 'topk'"),
    ({"normalize_activations": "covariance_whitening"}, {}, "normalize_activations='covariance_whitening'"),
    ({"reshape_activations": "hook_z"}, {}, "reshape_activations='hook_z' on hook 'blocks.0.hook_resid_pre'"),
    ({"activation_fn_kwargs": {"k": K, "temperature": 2}}, {}, "activation_fn_kwargs ['temperature']"),
    ({"activation_fn_kwargs": {"k": K + 1}}, {}, "activation_fn_kwargs k=5"),
    ({"k": None}, {}, "no k"),
    ({"apply_b_dec_to_input": 0.5}, {}, "apply_b_dec_to_input must be true or false"),
    ({"rescale_acts_by_decoder_norm": "yes"}, {}, "rescale_acts_by_decoder_norm must be true or false"),
])
def test_settings_saekit_cannot_honour_are_refused_by_name(tmp_path, cfg, extra, names):
    folder = write(tmp_path / "s", weights(), extra_files=extra, **cfg)
    with pytest.raises(SAEFileError, match=r"^[^\n]*$") as e:
        load_sae(folder)
    assert names in str(e.value)


def test_rescale_with_a_zero_decoder_row_is_refused(tmp_path):
    w = weights()
    w["W_dec"][3] = 0
    with pytest.raises(SAEFileError, match="rescale_acts_by_decoder_norm"):
        load_sae(write(tmp_path / "s", w, rescale_acts_by_decoder_norm=True))
    assert load_sae(write(tmp_path / "t", w)).W_dec[3].abs().sum() == 0  # without rescaling it is harmless


def test_a_scaling_factor_without_finetuning_scaling_factor_is_refused(tmp_path):
    w = {**weights(), "scaling_factor": torch.full((D_SAE,), 2.0)}
    with pytest.raises(SAEFileError, match="finetuning_scaling_factor is false"):
        load_sae(write(tmp_path / "s", w))
