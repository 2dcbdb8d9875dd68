import json

import pytest
import torch
from safetensors.torch import save_file

from saekit import SAE, SAEConfig, load_sae
from saekit.errors import ConfigError, SAEFileError
from saekit.training.losses import auxk_loss, encode_with_aux, squared_error, total_variance


def make_sae(d_in=24, d_sae=96, k=5, seed=0, **kw):
    return SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, **kw), seed=seed)


def test_shapes_and_exactly_k_nonzeros_per_row():
    sae = make_sae()
    x = torch.randn(7, 3, 24)
    out = sae(x)
    assert out.x_hat.shape == (7, 3, 24)
    f = sae.encode_dense(x)
    assert f.shape == (7, 3, 96)
    # pre-activations of a fresh SAE on centred data have plenty of positives: exactly k
    assert ((f > 0).sum(-1) == 5).all()
    torch.testing.assert_close(sae.decode_dense(f), out.x_hat, atol=1e-5, rtol=1e-5)
    # the kept latents are the k largest pre-activations
    pre = sae.pre_acts(x.reshape(-1, 24))
    top = pre.topk(5, dim=-1).indices.sort(-1).values
    assert torch.equal(f.reshape(-1, 96).nonzero()[:, 1].reshape(-1, 5), top)


def test_k_larger_than_d_sae_is_a_config_error():
    with pytest.raises(ConfigError, match="k=200 must be between 1 and d_sae=96"):
        SAEConfig(d_in=24, d_sae=96, k=200)


def test_hook_z_flatten_round_trip():
    sae = make_sae(d_in=4 * 6, hook_shape=(4, 6))
    z = torch.randn(2, 5, 4, 6)
    flat = sae.flatten_hook(z)
    assert flat.shape == (2, 5, 24)
    assert torch.equal(flat[0, 0, 6:12], z[0, 0, 1])  # head 1 is the second block
    assert torch.equal(sae.unflatten_hook(flat), z)


def test_decoder_norm_and_parallel_grad_removal():
    sae = make_sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.set_decoder_norm_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96))


def test_auxk_zero_without_dead_and_positive_with_dead():
    sae = make_sae()
    x = torch.randn(64, 24)
    enc = encode_with_aux(sae, x, None, None, 0)
    x_hat = sae.decode(enc.codes)
    denom = total_variance(x)
    assert auxk_loss(sae, x, x_hat, enc.aux, 0, 12, 1 / 32, denom)["aux"].item() == 0
    dead = torch.zeros(96, dtype=torch.bool)
    dead[:40] = True
    enc = encode_with_aux(sae, x, None, dead, 12)
    assert enc.aux is not None and (enc.aux.indices < 40).all()
    aux = auxk_loss(sae, x, x_hat, enc.aux, 40, 12, 1 / 32, denom)["aux"]
    assert aux.item() > 0
    aux.backward()
    assert sae.W_enc_T.grad[:40].abs().sum() > 0 and sae.W_enc_T.grad[40:].abs().sum() == 0  # rows = latents


@pytest.mark.parametrize("fmt", ["saekit", "saelens"])
def test_save_load_round_trip(tmp_path, fmt):
    sae = make_sae(hook_name="blocks.1.attn.hook_z", model_name="m", d_in=24, hook_shape=(4, 6))
    sae.save(tmp_path / "s", format=fmt)
    back = load_sae(tmp_path / "s")
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, n), getattr(sae, n))
    assert back.cfg == sae.cfg
    assert not list((tmp_path / "s").glob("*.tmp"))  # nothing half-written left behind


def test_loads_hand_made_saelens_folder(tmp_path):
    d_in, d_sae = 8, 32
    w = {"W_enc": torch.randn(d_in, d_sae), "b_enc": torch.randn(d_sae),
         "W_dec": torch.randn(d_sae, d_in), "b_dec": torch.randn(d_in)}
    save_file(w, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": 4, "dtype": "float32",
        "metadata": {"hook_name": "blocks.0.hook_resid_pre", "model_name": "gpt2"}}))
    sae = load_sae(tmp_path)
    assert (sae.cfg.k, sae.cfg.hook_name, sae.cfg.model_name) == (4, "blocks.0.hook_resid_pre", "gpt2")
    x = torch.randn(5, d_in)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(sae.pre_acts(x), pre)


def test_loads_hand_made_sparsify_folder(tmp_path):
    d_in, d_sae = 8, 32
    enc_w, enc_b = torch.randn(d_sae, d_in), torch.randn(d_sae)
    W_dec, b_dec = torch.randn(d_sae, d_in), torch.randn(d_in)
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
              tmp_path / "sae.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"expansion_factor": 4, "normalize_decoder": True,
                                                   "num_latents": 0, "k": 3, "d_in": d_in}))
    sae = load_sae(tmp_path)
    x = torch.randn(5, d_in)
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    vals, idx = pre.topk(3)
    expect = torch.zeros(5, d_sae).scatter(1, idx, vals) @ W_dec + b_dec
    torch.testing.assert_close(sae(x).x_hat, expect, atol=1e-5, rtol=1e-5)
    (tmp_path / "cfg.json").write_text(json.dumps({"expansion_factor": 4, "d_in": d_in}))
    with pytest.raises(SAEFileError, match="gives no k"):  # was a bare KeyError
        load_sae(tmp_path)


def test_missing_and_corrupt_files_get_specific_errors(tmp_path):
    with pytest.raises(SAEFileError, match="no SAE folder"):
        load_sae(tmp_path / "nope")
    sae = make_sae()
    sae.save(tmp_path / "s")
    (tmp_path / "s" / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAEFileError, match="corrupt"):
        load_sae(tmp_path / "s")
    (tmp_path / "s" / "sae.safetensors").unlink()
    with pytest.raises(SAEFileError, match="no sae.safetensors"):
        load_sae(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text("{")
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(SAEFileError, match="not valid JSON"):
        load_sae(tmp_path / "s")


def test_W_enc_is_a_view_of_its_stored_transpose_and_files_keep_saelens_layout():
    sae = make_sae(d_in=24)
    assert sae.W_enc.shape == (24, sae.cfg.d_sae) and sae.W_enc_T.is_contiguous()
    assert sae.W_enc.data_ptr() == sae.W_enc_T.data_ptr()
    sd = sae.state_dict()
    assert "W_enc_T" not in sd and sd["W_enc"].shape == (24, sae.cfg.d_sae)
    other = make_sae(d_in=24, seed=1)
    other.load_state_dict(sd)
    assert torch.equal(other.W_enc, sae.W_enc)
    with torch.no_grad():  # in-place edits through the view reach the parameter
        other.W_enc[:, 3] = 0
    assert (other.W_enc_T[3] == 0).all()


def test_squared_error_and_its_gradient_match_autograd():
    x, x_hat = torch.randn(9, 24, dtype=torch.float64), torch.randn(9, 24, dtype=torch.float64, requires_grad=True)
    ref = (x - x_hat).pow(2).sum()
    got = squared_error(x_hat, x)
    torch.testing.assert_close(got, ref)
    (g_ref,) = torch.autograd.grad(3 * ref, x_hat)
    (g_got,) = torch.autograd.grad(3 * got, x_hat)
    torch.testing.assert_close(g_got, g_ref)
    torch.testing.assert_close(total_variance(x), ((x - x.mean(0)) ** 2).sum())


def test_W_enc_cannot_be_rebound_and_assign_loading_keeps_its_rows_contiguous():
    sae = make_sae()
    with pytest.raises(AttributeError, match="W_enc_T"):
        sae.W_enc = torch.nn.Parameter(torch.zeros(24, 96))
    other = make_sae(seed=1)
    other.load_state_dict({k: v.clone().contiguous() for k, v in sae.state_dict().items()}, assign=True)
    assert other.W_enc_T.is_contiguous() and torch.equal(other.W_enc, sae.W_enc)


def test_squared_error_refuses_a_second_derivative():
    x, x_hat = torch.randn(4, 3), torch.randn(4, 3, requires_grad=True)
    (g,) = torch.autograd.grad(squared_error(x_hat, x), x_hat, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_every_sparsifier_is_registered_once_and_states_its_needs():
    """The registry (saekit.sparsity.SPARSIFIERS) and the names the command line offers
    (saekit.types.SparsityName) agree, and each class declares what the trainer, the data
    path and data parallelism ask of it."""
    import typing

    from saekit.elementwise import RULES
    from saekit.sparsity import SPARSIFIERS
    from saekit.types import SparsityName

    assert set(typing.get_args(SparsityName)) == set(SPARSIFIERS) | set(RULES)
    assert not set(SPARSIFIERS) & set(RULES)
    for cls in RULES.values():
        assert all(isinstance(getattr(cls, a), bool) for a in ("uses_grad", "batch_level", "row_topk", "unit_decoder"))
    for cls in SPARSIFIERS.values():
        assert all(isinstance(getattr(cls, a), bool) for a in ("uses_grad", "batch_level", "row_topk")), cls
        assert callable(cls.select)
