"""Gemma Scope's params.npz and Kissane et al.'s NAME.pt + NAME_cfg.json: each loads with its
authors' function (written out here), and Gemma Scope through an offline Hub cache
(tests/test_hub.py lays it out) takes its hook from the repository's name."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit import load_sae
from saekit.attention import head_attribution
from saekit.errors import SAEFileError
from saekit.formats import results_folder
from tests.test_attention import _check_dfa_identity
from tests.test_hub import hub_cache, run_offline

D_IN, D_SAE = 8, 32
X = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


# ---- Gemma Scope --------------------------------------------------------------------------------

def gemma_arrays(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "W_dec": torch.randn(D_SAE, D_IN, generator=g),
         "b_enc": torch.randn(D_SAE, generator=g), "b_dec": torch.randn(D_IN, generator=g) * 2,
         "threshold": torch.rand(D_SAE, generator=g) * 2 - 0.3}  # a few negative
    return {k: v.numpy() for k, v in a.items()}


def gemma_scope(x, a):
    """Gemma Scope's JumpReLU (the release tutorial's JumpReLUSAE): no b_dec subtracted first."""
    a = {k: torch.from_numpy(v) for k, v in a.items()}
    p = x @ a["W_enc"] + a["b_enc"]
    f = p.relu() * (p > a["threshold"])
    return f, f @ a["W_dec"] + a["b_dec"]


def write_npz(path, arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("site, hook", [("res", "blocks.3.hook_resid_post"), ("mlp", "blocks.3.hook_mlp_out")])
def test_gemma_scope_npz_loads_as_jumprelu_with_its_function(tmp_path, site, hook):
    a = gemma_arrays()
    folder = tmp_path / f"gemma-scope-2b-pt-{site}" / "layer_3" / "width_16k" / "average_l0_82"
    npz = write_npz(folder / "params.npz", a)
    for path in (npz, npz.parent):  # the file, or its folder
        sae = load_sae(path)
        assert (sae.cfg.sparsity, sae.cfg.hook_name, sae.cfg.model_name) == ("jumprelu", hook, "google/gemma-2-2b")
        f, x_hat = gemma_scope(X, a)
        close(sae.encode_dense(X), f)
        close(sae(X).x_hat, x_hat)
    assert results_folder(npz) == npz.parent


def test_gemma_scope_round_trip_through_saelens_and_saekit_files(tmp_path):
    a = gemma_arrays(seed=2)
    sae = load_sae(write_npz(tmp_path / "gemma-scope-9b-it-res" / "layer_20" / "width_131k" / "params.npz", a))
    assert sae.cfg.model_name == "google/gemma-2-9b-it" and sae.cfg.hook_name == "blocks.20.hook_resid_post"
    f, x_hat = gemma_scope(X, a)
    for fmt in ("saelens", "saekit"):
        sae.save(tmp_path / fmt, format=fmt)
        again = load_sae(tmp_path / fmt)
        close(again.encode_dense(X), f)
        close(again(X).x_hat, x_hat)


def test_gemma_scope_hook_from_the_caller(tmp_path):
    npz = write_npz(tmp_path / "my-sae" / "params.npz", gemma_arrays())
    with pytest.raises(SAEFileError, match=r"^[^\n]*names no hook; pass load_sae\(\.\.\., hook_name="):
        load_sae(npz)
    sae = load_sae(npz, hook_name="blocks.1.hook_resid_post", model_name="google/gemma-2-2b")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.model_name == "google/gemma-2-2b"


def test_gemma_scope_npz_without_threshold_is_refused(tmp_path):
    a = gemma_arrays()
    del a["threshold"]
    with pytest.raises(SAEFileError, match=r"^[^\n]*params.npz has no threshold array; Gemma Scope's params.npz holds"):
        load_sae(write_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_0" / "params.npz", a))


# ---- Kissane et al. ----------------------------------------------------------------------------

def write_kissane(folder, name, d_in, d_sae, act_name, model_name="gpt2-small", seed=0, **cfg):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3, "W_dec": torch.randn(d_sae, d_in, generator=g),
         "b_enc": torch.randn(d_sae, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(w, folder / f"{name}.pt")
    layer = int(act_name.split(".")[1])
    full = {"seed": 49, "batch_size": 4096, "lr": 0.0012, "l1_coeff": 1.1, "dict_mult": d_sae // d_in,
            "enc_dtype": "fp32", "model_name": model_name, "site": "z", "layer": layer, "device": "cuda",
            "head": "cat", "concat_heads": True, "act_name": act_name, "act_size": d_in, "dict_size": d_sae,
            "name": f"{model_name}_{layer}_{d_sae}_z", **cfg}
    (folder / f"{name}_cfg.json").write_text(json.dumps(full))
    return folder / f"{name}.pt", w


def test_kissane_gpt2_small_sae_loads_as_standard_on_hook_z(tmp_path):
    pt, w = write_kissane(tmp_path, "gpt2-small_L5_Hcat_z_lr1.20e-03_l11.00e+00_ds1536_v9", 768, 1536,
                          "blocks.5.attn.hook_z")
    sae = load_sae(pt)
    assert (sae.cfg.sparsity, sae.cfg.hook_name, sae.cfg.model_name) == ("standard", "blocks.5.attn.hook_z", "gpt2")
    assert sae.cfg.hook_shape == (12, 64)
    x = torch.randn(16, 768)
    f = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()  # their AutoEncoder.forward
    close(sae.encode_dense(x), f)
    close(sae(x).x_hat, f @ w["W_dec"] + w["b_dec"])
    assert results_folder(pt) == pt.with_suffix("")


def test_kissane_sae_on_the_embedded_model_gives_head_attribution_and_dfa(tmp_path, model):
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    pt, _ = write_kissane(tmp_path, "saekit-ioi-6l_L3_Hcat_z_v0", n_heads * d_head, 64, "blocks.3.attn.hook_z",
                          model_name="saekit-ioi-6l")
    sae = load_sae(pt)
    share = head_attribution(sae, model)  # the model fills in (n_heads, d_head)
    assert share.shape == (64, n_heads)
    close(share.sum(1), torch.ones(64))
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")[0]
    _check_dfa_identity(model, sae, tokens, latents=[1, 30], dests=[4, len(tokens) - 1])


def test_kissane_files_that_are_not_plain_tensors_are_refused(tmp_path):
    pt, _ = write_kissane(tmp_path, "sae", 8, 32, "blocks.0.attn.hook_z")
    torch.save({"W_enc": torch.zeros(8, 32), "extra": Path("code")}, pt)  # unpickling needs more than tensors
    with pytest.raises(SAEFileError, match=r"^[^\n]*sae.pt is not a readable tensor state dict"):
        load_sae(pt)
    pt.with_name("sae_cfg.json").unlink()
    with pytest.raises(SAEFileError, match=r"^[^\n]*no sae_cfg.json beside it"):
        load_sae(pt)


def test_kissane_shapes_that_disagree_with_the_cfg_are_named(tmp_path):
    pt, w = write_kissane(tmp_path, "sae", 8, 32, "blocks.0.attn.hook_z")
    torch.save({**w, "b_enc": torch.zeros(31)}, pt)
    with pytest.raises(SAEFileError, match=r"^[^\n]*tensor b_enc has shape \(31,\), sae_cfg.json implies \(32,\)"):
        load_sae(pt)


# ---- Gemma Scope on the Hub ---------------------------------------------------------------------

def test_gemma_scope_on_the_hub_takes_its_hook_from_the_repository_name(tmp_path):
    cache = tmp_path / "cache"
    npz = write_npz(tmp_path / "params.npz", gemma_arrays())
    hub_cache(cache, "google/gemma-scope-2b-pt-mlp", {"layer_7/width_16k/average_l0_20/params.npz": npz.read_bytes()},
              "d" * 40)
    code = ("import saekit\n"
            "s = saekit.load_sae('hf://google/gemma-scope-2b-pt-mlp/layer_7/width_16k/average_l0_20')\n"
            "print(s.cfg.sparsity, s.cfg.hook_name, s.cfg.model_name)\n")
    r = run_offline(tmp_path, cache, [], code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["jumprelu", "blocks.7.hook_mlp_out", "google/gemma-2-2b"]
