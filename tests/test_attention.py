"""saekit.attention on tiny models built from configs: GPT-2 (LayerNorm, b_V in c_attn) and
Llama with grouped-query attention (4 query heads over 2 key/value heads, RMSNorm)."""

import pytest
import torch

from saekit.activations import harvest, resolve_hook
from saekit.attention import (_kv_head_index, dfa, head_attribution, latent_logits, logit_effect,
                              logit_effects)
from saekit.errors import ConfigError, MismatchError
from saekit.models import load_model
from saekit.sae import SAE, SAEConfig
from tests.arch_helpers import ARCHITECTURES

N_HEADS, D_HEAD, D_MODEL = 4, 8, 32
HOOK = "blocks.1.attn.hook_z"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[bos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["When Mary and John went to the store, John gave a drink to Mary."] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=bos, unk_token=bos)


def _hf_model(arch: str, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=2, n_embd=D_MODEL, n_head=N_HEADS,
                                        n_positions=32, bos_token_id=0, eos_token_id=0))
        ln_f = hf.transformer.ln_f
        for block in hf.transformer.h:  # give b_V (in c_attn) a real size, as trained GPT-2s have
            torch.nn.init.normal_(block.attn.c_attn.bias, std=0.5)
    else:
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=N_HEADS,
                                          num_key_value_heads=2, max_position_embeddings=32,
                                          bos_token_id=0, eos_token_id=0))
        ln_f = hf.model.norm
    with torch.no_grad():  # a final-norm weight far from 1, so folding it in matters
        ln_f.weight.uniform_(0.2, 2.0)
    return hf


@pytest.fixture(scope="module", params=["gpt2", "llama_gqa"])
def tiny(request, tmp_path_factory):
    """(bridge, HF model) for a 2-layer model with 4 heads of 8 dims, saved and reloaded."""
    tok = _tokenizer()
    hf = _hf_model(request.param.split("_")[0], len(tok))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return load_model(str(path)), hf.eval()


def _sae(hook=HOOK, d_in=N_HEADS * D_HEAD, hook_shape=(N_HEADS, D_HEAD), seed=0, sparsity="topk"):
    sae = SAE(SAEConfig(d_in=d_in, d_sae=64, k=8, hook_name=hook, hook_shape=hook_shape, sparsity=sparsity), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases, so the test sees that DFA leaves them out
        sae.b_enc.copy_(torch.randn(sae.cfg.d_sae, generator=gen))
        sae.b_dec.copy_(torch.randn(sae.cfg.d_in, generator=gen))
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=gen))  # W_enc ≠ W_decᵀ
    return sae


# ---- head attribution ---------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", ARCHITECTURES)
def test_head_attribution_is_block_norm_share(sparsity):
    sae = _sae(sparsity=sparsity)
    with torch.no_grad():
        sae.W_dec[3] = 0.0  # a dead decoder row gets zeros, not NaN
        sae.W_dec[5, :D_HEAD] = 0.0  # a latent that writes nothing from head 0
    share = head_attribution(sae)  # [d_sae, n_heads]
    assert share.shape == (64, N_HEADS)
    i = 7
    norms = torch.tensor([sae.W_dec[i, h * D_HEAD:(h + 1) * D_HEAD].norm().item() for h in range(N_HEADS)])
    torch.testing.assert_close(share[i], norms / norms.sum())
    alive = torch.arange(64) != 3
    torch.testing.assert_close(share[alive].sum(1), torch.ones(63))
    assert share[3].eq(0).all() and share[5, 0] == 0 and (share >= 0).all()


def test_head_attribution_needs_heads():
    with pytest.raises(MismatchError, match="hook_shape"):
        head_attribution(_sae(hook="blocks.1.hook_resid_pre", hook_shape=()))


def test_kv_head_index_is_repeat_interleave():
    """Query head h reads kv head h // (n_heads // n_kv_heads), HF's repeat_kv layout."""
    assert _kv_head_index(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert _kv_head_index(6, 6).tolist() == list(range(6))
    v = torch.randn(5, 2, 3)  # [pos, n_kv_heads, d_head]
    torch.testing.assert_close(v[:, _kv_head_index(8, 2)], v.repeat_interleave(4, dim=1))
    with pytest.raises(MismatchError, match="split evenly"):
        _kv_head_index(4, 3)


# ---- DFA ----------------------------------------------------------------------------------
def _check_dfa_identity(model, sae, tokens, latents, dests):
    """Σ_h,src DFA == x·W_enc[:, i], with x harvested independently (run_with_hooks), and
    with ``bias`` the pre-activation written out from the state dict: (x − b_dec)·W_enc + the
    encoder bias under its file name (gated: ``b_gate``, the gate's pre-activation)."""
    x = harvest(model, tokens[None], resolve_hook(model, sae.cfg.hook_name))  # [T-1, d_in], BOS dropped
    state = sae.state_dict()
    pre = (x - state["b_dec"]) @ state["W_enc"] + state["b_gate" if sae.cfg.sparsity == "gated" else "b_enc"]
    f = sae.encode_dense(x)  # [T-1, d_sae]
    assert (f > 0).sum() >= len(x)  # latents fire ...
    assert bool((pre[f > 0] > 0).all())  # ... only where this pre-activation is positive
    for i in latents:
        for dest in dests:
            r = dfa(model, sae, tokens, i, dest)
            assert r.by_head.shape == (model.cfg.n_heads,)
            assert r.by_source.shape == (model.cfg.n_heads, len(tokens))
            proj = x[dest - 1] @ sae.W_enc[:, i]
            scale = 1 + proj.abs().item()
            torch.testing.assert_close(r.by_source.sum(1), r.by_head, atol=1e-5 * scale, rtol=1e-4)
            torch.testing.assert_close(r.by_head.sum(), proj, atol=1e-4 * scale, rtol=1e-4)
            torch.testing.assert_close(r.by_source.sum(), proj, atol=1e-4 * scale, rtol=1e-4)
            torch.testing.assert_close(r.by_head.sum() + r.bias, pre[dest - 1, i], atol=1e-4 * scale, rtol=1e-4)
            assert r.by_source[:, dest + 1:].eq(0).all()  # causal: no later source contributes


@pytest.mark.filterwarnings("error:hook_z differs")  # z == pattern @ v must hold: no warning
@pytest.mark.parametrize("sparsity", ARCHITECTURES)
def test_dfa_sums_to_encoder_projection(tiny, sparsity):
    model, _ = tiny
    sae = _sae(sparsity=sparsity)
    tokens = torch.randint(1, model.cfg.d_vocab, (12,), generator=torch.Generator().manual_seed(0))
    tokens[0] = model.tokenizer.bos_token_id
    _check_dfa_identity(model, sae, tokens, latents=[0, 17, 63], dests=[1, 5, 11])


def test_dfa_uses_fewer_kv_heads_on_gqa(tiny):
    model, hf = tiny
    _, cache = model.run_with_cache(torch.tensor([[0, 5, 9]]), names_filter=["blocks.1.attn.hook_v"])
    n_kv = cache["blocks.1.attn.hook_v"].shape[2]  # [batch, pos, head_kv, d_head]
    assert n_kv == (N_HEADS if hasattr(hf, "transformer") else 2)  # Llama: 2 kv heads
    r = dfa(model, _sae(), "Mary and John went to the store", latent=-1, dest=-1)  # string input
    torch.testing.assert_close(r.by_source.sum(1), r.by_head, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("error:hook_z differs")
@pytest.mark.parametrize("sparsity", ARCHITECTURES)
def test_dfa_on_embedded_model(model, sparsity):
    """The identity on the trained GPT-2 (real b_V), at the hook the DESIGN names."""
    sae = _sae(hook="blocks.5.attn.hook_z", d_in=model.cfg.n_heads * model.cfg.d_head,
               hook_shape=(model.cfg.n_heads, model.cfg.d_head), sparsity=sparsity)
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")[0]
    _check_dfa_identity(model, sae, tokens, latents=[2, 40], dests=[3, len(tokens) - 1])


def test_dfa_warns_when_z_is_not_pattern_at_v(tiny, monkeypatch):
    """An architecture whose z has a part the pattern does not explain: by_source cannot sum."""
    model, _ = tiny
    run = model.run_with_cache

    def shifted(*args, **kwargs):
        logits, cache = run(*args, **kwargs)
        cache.cache_dict[HOOK] = cache[HOOK] + 1.0  # a term outside Σ_src A·v
        return logits, cache

    monkeypatch.setattr(model, "run_with_cache", shifted)
    with pytest.warns(UserWarning, match="hook_z differs from hook_pattern @ hook_v"):
        dfa(model, _sae(), torch.tensor([0, 5, 9]), 0, 2)


# ---- logit effects ------------------------------------------------------------------------
def _assert_close_rel(got, want, tol=1e-4):
    """Max error within ``tol`` of want's largest entry (a tiny random model's logit effects
    are ~1e-3, so a fixed atol would hide a wrong formula)."""
    err, size = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= tol * size, f"max error {err:.3g} vs max |want| {size:.3g}"


def _hand_logits(hf, sae, i, fold_ln):
    """The direct path from the HF weights: W_dec[i] → out-projection → final norm → unembedding."""
    if hasattr(hf, "transformer"):  # GPT-2: Conv1D c_proj.weight is [n_heads·d_head, d_model]
        u = sae.W_dec[i] @ hf.transformer.h[1].attn.c_proj.weight
        ln_f, center = hf.transformer.ln_f, True
    else:  # Llama: Linear o_proj.weight is [d_model, n_heads·d_head]
        u = sae.W_dec[i] @ hf.model.layers[1].self_attn.o_proj.weight.T
        ln_f, center = hf.model.norm, False
    if fold_ln:
        u = (u - u.mean() if center else u) * ln_f.weight
    return u @ hf.lm_head.weight.T  # lm_head.weight: [d_vocab, d_model]


@pytest.mark.parametrize("fold_ln", [True, False])
def test_logit_effect_matches_hand_computation(tiny, fold_ln):
    model, hf = tiny
    sae = _sae()
    with torch.no_grad():
        want = _hand_logits(hf, sae, 9, fold_ln)  # [d_vocab]
    _assert_close_rel(latent_logits(model, sae, [9], fold_ln)[0], want)
    eff = logit_effect(model, sae, 9, top=5, fold_ln=fold_ln)
    up, down = want.topk(5), want.topk(5, largest=False)
    assert [t for t, _ in eff.boosted] == [model.tokenizer.decode([j]) for j in up.indices.tolist()]
    assert [t for t, _ in eff.suppressed] == [model.tokenizer.decode([j]) for j in down.indices.tolist()]
    torch.testing.assert_close(torch.tensor([v for _, v in eff.boosted]), up.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([v for _, v in eff.suppressed]), down.values, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")  # the bridge's notice; intended here
def test_logit_effect_is_the_model_with_frozen_norm_scale(tiny):
    """Adding Σ_h d_i[h] W_O[h] to the final norm's input, with its scale σ frozen, moves the
    logits by exactly latent_logits / σ: the fold_ln maths is the model's own."""
    model, _ = tiny
    sae, i = _sae(), 21
    W_O = model.blocks[1].attn.W_O  # [n_heads, d_head, d_model]
    u = torch.einsum("hd,hdm->m", sae.W_dec[i].detach().view(N_HEADS, D_HEAD), W_O)  # [d_model]
    tokens = torch.tensor([[0, 5, 9, 20, 33]])
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=["ln_final.hook_scale"])
        sigma = cache["ln_final.hook_scale"]  # [batch, pos, 1]
        hooks = [("ln_final.hook_in", lambda x, hook: x + u),
                 ("ln_final.hook_scale", lambda s, hook: sigma)]
        moved = model.run_with_hooks(tokens, fwd_hooks=hooks)
    want = latent_logits(model, sae, [i])[0]  # [d_vocab]
    _assert_close_rel((moved - clean)[0] * sigma[0], want.expand(5, -1))


def test_logit_effects_batched_equals_single(tiny):
    model, _ = tiny
    sae = _sae()
    allk = logit_effects(model, sae, top=3, chunk=24)  # chunks of 24, 24, 16
    assert allk.boosted_ids.shape == allk.suppressed_values.shape == (64, 3)
    for i in [0, 30, 63]:
        one = logit_effect(model, sae, i, top=3)
        assert [t for t, _ in one.boosted] == model.tokenizer.batch_decode([[j] for j in allk.boosted_ids[i].tolist()])
        torch.testing.assert_close(allk.suppressed_values[i], torch.tensor([v for _, v in one.suppressed]))
    assert (allk.boosted_values[:, 0] >= allk.boosted_values[:, -1]).all()


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(hook="blocks.1.hook_resid_pre", hook_shape=()), "not an attention output"),
    (dict(hook="blocks.7.attn.hook_z"), "does not have"),
    (dict(d_in=64, hook_shape=(8, 8)), "d_in=64"),
    (dict(hook_shape=(2, 16)), "hook_shape"),
])
def test_wrong_sae_raises_mismatch(tiny, kwargs, match):
    model, _ = tiny
    sae = _sae(**kwargs)
    for call in (lambda: dfa(model, sae, torch.tensor([0, 5, 9]), 0, 2),
                 lambda: logit_effect(model, sae, 0),
                 lambda: head_attribution(sae, model)):
        with pytest.raises(MismatchError, match=match):
            call()


def test_bad_latent_dest_or_tokens_raise(tiny):
    model, _ = tiny
    sae = _sae()
    with pytest.raises(ConfigError, match="latent 64"):
        dfa(model, sae, torch.tensor([0, 5, 9]), 64, 2)
    with pytest.raises(ConfigError, match="dest=3"):
        dfa(model, sae, torch.tensor([0, 5, 9]), 0, 3)
    with pytest.raises(ConfigError, match="one sequence"):
        dfa(model, sae, torch.zeros(2, 3, dtype=torch.long), 0, 1)
    with pytest.raises(ConfigError, match="latents must lie"):
        latent_logits(model, sae, [64])
