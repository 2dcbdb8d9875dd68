"""saekit.steering on the embedded model, with seeded random SAEs at an attention output
(hook_z, reshaped per head) and at the residual stream, for every sparsifier."""

import pytest
import torch

from saekit.attention import logit_effect
from saekit.errors import ConfigError, MismatchError
from saekit.sae import SAE, SAEConfig
from saekit.steering import (Ablate, Add, Cap, Clamp, generate, hooks, ioi_logit_diff, ioi_names, make,
                             position_index, run_on_reconstruction, steer)
from tests.arch_helpers import ARCHITECTURES, as_if_trained_

PROMPT = "When Mary and John went to the store, John gave a drink to"
HOOKS = {"blocks.5.attn.hook_z": (4, 32), "blocks.3.hook_resid_post": (128,)}
VARIANTS = ARCHITECTURES


def make_sae(hook="blocks.5.attn.hook_z", sparsity="topk", seed=0):
    shape = HOOKS[hook]
    cfg = SAEConfig(d_in=128, d_sae=512, k=16, sparsity=sparsity, hook_name=hook,
                    model_name="saekit-ioi-6l", hook_shape=shape)
    sae = SAE(cfg, seed=seed)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return as_if_trained_(sae).eval()


def captured(model, tokens, hook, interventions):
    """The activation at ``hook`` after the interventions edited it, and the clean one."""
    box = {}

    def grab(act, hook=None):
        box["x"] = act.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)])
        clean = box["x"]
        model.run_with_hooks(tokens, fwd_hooks=hooks(model, interventions) + [(hook, grab)])
    return box["x"], clean


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(PROMPT)


@pytest.mark.parametrize("hook", list(HOOKS))
def test_adding_with_coefficient_zero_changes_nothing(model, tokens, hook):
    sae = make_sae(hook)
    with torch.no_grad():
        clean = model(tokens)
        with steer(model, [Add(sae, 3, 0.0)]):
            steered = model(tokens)
    assert torch.equal(steered, clean)


@pytest.mark.parametrize("sparsity", VARIANTS)
@pytest.mark.parametrize("hook", list(HOOKS))
def test_clamping_a_latent_to_its_own_value_changes_nothing(model, tokens, hook, sparsity):
    sae = make_sae(hook, sparsity)
    _, x = captured(model, tokens, hook, [])
    pos = tokens.shape[1] - 1
    f = sae.encode_dense(sae.flatten_hook(x[:, pos]))[0]  # [d_sae]
    latent = int(f.argmax())
    assert f[latent] > 0
    with torch.no_grad():
        clean = model(tokens)
        with steer(model, [Clamp(sae, latent, f[latent].item(), positions=[pos])]):
            steered = model(tokens)
    assert torch.equal(steered, clean)


@pytest.mark.parametrize("sparsity", VARIANTS)
@pytest.mark.parametrize("hook", list(HOOKS))
def test_ablating_every_active_latent_leaves_the_error_term(model, tokens, hook, sparsity):
    """With every active latent at 0 the SAE's part is decode(0) = b_dec, so the hook holds
    exactly b_dec + (x − x̂): the error term on top of the decoder bias."""
    sae = make_sae(hook, sparsity)
    _, x = captured(model, tokens, hook, [])
    flat = sae.flatten_hook(x[0, 1:])  # [T-1, d_in], BOS excluded as "all" does
    active = sae.encode_dense(flat).abs().sum(0).nonzero().flatten().tolist()
    assert active
    out, clean = captured(model, tokens, hook, [Ablate(sae, active)])
    x_hat = sae(flat).x_hat
    expected = flat - x_hat + sae.b_dec
    torch.testing.assert_close(sae.flatten_hook(out[0, 1:]), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 0], clean[:, 0])  # BOS untouched


def test_a_large_coefficient_raises_the_boosted_token(model, tokens):
    sae = make_sae()
    for latent in range(5):
        top = logit_effect(model, sae, latent, top=1).boosted[0][0]
        t = model.tokenizer.convert_tokens_to_ids(model.tokenizer.tokenize(top))[0]
        with torch.no_grad():
            p_clean = model(tokens)[0, -1].softmax(-1)[t]
            with steer(model, [Add(sae, latent, 200.0, positions="last")]):
                p_steered = model(tokens)[0, -1].softmax(-1)[t]
        assert p_steered > p_clean, (latent, top)


def test_cap_bounds_the_projection_and_leaves_the_rest(model, tokens):
    sae = make_sae()
    hook = sae.cfg.hook_name
    u = sae.W_dec[7] / sae.W_dec[7].norm()
    out, clean = captured(model, tokens, hook, [Cap(sae, 7, -0.5)])
    proj_out = sae.flatten_hook(out[0, 1:]) @ u
    proj_clean = sae.flatten_hook(clean[0, 1:]) @ u
    assert (proj_out <= -0.5 + 1e-5).all()
    torch.testing.assert_close(proj_out, proj_clean.clamp(max=-0.5), rtol=1e-5, atol=1e-5)
    rest = lambda x: x - (x @ u)[:, None] * u  # noqa: E731
    torch.testing.assert_close(rest(sae.flatten_hook(out[0, 1:])), rest(sae.flatten_hook(clean[0, 1:])),
                               rtol=1e-5, atol=1e-5)


def test_positions_last_and_chosen(model, tokens):
    sae = make_sae()
    T = tokens.shape[1]
    assert position_index("all", T) == list(range(1, T))
    assert position_index("last", T) == [T - 1]
    assert position_index([2, -1, 99], T) == [2, T - 1]
    out, clean = captured(model, tokens, sae.cfg.hook_name, [Add(sae, 1, 5.0, positions=[2])])
    changed = (out != clean).flatten(2).any(-1)[0]  # [T]
    assert changed.tolist() == [i == 2 for i in range(T)]


@pytest.mark.parametrize("sparsity", VARIANTS)
def test_splice_matches_the_reconstruction(model, tokens, sparsity):
    from saekit.splice import reconstruct_hook
    from saekit.steering import Reconstruct

    sae = make_sae(sparsity=sparsity)
    hook = sae.cfg.hook_name
    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(hook, reconstruct_hook(sae))])
        with run_on_reconstruction(model, sae):
            got = model(tokens)
        spliced, clean = captured(model, tokens, hook, [Reconstruct(sae)])  # what run_on_reconstruction runs
        flat = sae.flatten_hook(clean[0, 1:])  # [T-1, d_in]
        x_hat = sae.decode(sae.encode(flat))  # the architecture's own encoder and decoder
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(sae.flatten_hook(spliced[0, 1:]), x_hat, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spliced[0, 1:], clean[0, 1:])  # the splice replaced something


def test_generate_returns_both_continuations(model):
    sae = make_sae()
    same = generate(model, PROMPT, [Add(sae, 0, 0.0)], max_new_tokens=5)
    assert same.steered == same.unsteered and same.steered
    g = generate(model, PROMPT, [make("add", sae, 0, 300.0)], max_new_tokens=5)
    assert g.unsteered == same.unsteered and g.steered != g.unsteered
    sampled = [generate(model, PROMPT, [], max_new_tokens=5, temperature=1.0, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded


def test_ioi_logit_difference_before_and_after(model):
    assert ioi_names(PROMPT) == ("Mary", "John")
    assert ioi_names("Mary went home.") is None
    sae = make_sae()
    d = ioi_logit_diff(model, PROMPT, [Add(sae, 0, 0.0)])
    assert d.before > 0 and d.after == pytest.approx(d.before)
    assert ioi_logit_diff(model, "The cat sat.", []) is None


def test_bad_input_is_one_specific_error(model):
    sae = make_sae()
    with pytest.raises(ConfigError, match="out of range"):
        Add(sae, 512, 1.0)
    with pytest.raises(ConfigError, match="positions"):
        Add(sae, 1, 1.0, positions="first")
    with pytest.raises(ConfigError, match="unknown steering method"):
        make("multiply", sae, 1, 2.0)
    with pytest.raises(ConfigError, match="empty"):
        generate(model, "  ", [])
    wrong = SAE(SAEConfig(d_in=64, d_sae=32, k=4, hook_name="blocks.5.attn.hook_z"))
    with pytest.raises(MismatchError):
        steer(model, [Add(wrong, 1, 1.0)]).__enter__()
