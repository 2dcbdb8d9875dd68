"""Tools for SAEs trained on attention outputs, ``blocks.L.attn.hook_z`` (Kissane et al. 2024).

Such an SAE reads ``z`` flattened over heads, ``x = concat_h z_h`` with
``d_in = n_heads·d_head`` (head-major, as ``SAE.flatten_hook``). Every vector of length
``d_in`` (a decoder row, an encoder column) therefore splits into per-head blocks of
``d_head``: block ``h`` is ``[h·d_head, (h+1)·d_head)``.

- ``head_attribution``: which heads a latent writes from (decoder-row block norms).
- ``dfa``: direct feature attribution of a latent's pre-activation at one destination
  token, by head and by source token (the attention pattern times the value vectors).
- ``logit_effect`` / ``logit_effects``: the tokens a latent's decoder direction directly
  boosts and suppresses (through ``W_O``, the final norm's linear part and ``W_U``).

Everything works on any ``TransformerBridge`` model, grouped-query attention included: a
query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``, the
``repeat_interleave`` layout that HF's ``repeat_kv`` and TransformerLens use.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from saekit.activations import hook_names
from saekit.errors import ConfigError, MismatchError
from saekit.hooks import hook_z_layer, hook_z_name
from saekit.splice import check_sae_fits


# ---- checks -------------------------------------------------------------------------------
class HookZ(NamedTuple):
    """Where a hook_z SAE sits: its layer and the per-token shape of ``z``."""

    layer: int
    n_heads: int
    d_head: int


def check_hook_z_sae(model, sae) -> HookZ:
    """Raise ``MismatchError`` unless ``sae`` is a ``blocks.L.attn.hook_z`` SAE of ``model``."""
    layer = hook_z_layer(sae.cfg.hook_name)
    if layer is None:
        raise MismatchError(f"the SAE reads {sae.cfg.hook_name!r}, not an attention output; "
                            "these tools need an SAE trained on blocks.L.attn.hook_z")
    sae.cfg = check_sae_fits(model, sae)  # hook exists on the model and d_in matches
    shape = hook_names(model)[sae.cfg.hook_name]  # (n_heads, d_head)
    if len(shape) != 2 or (sae.cfg.hook_shape and tuple(sae.cfg.hook_shape) != tuple(shape)):
        raise MismatchError(f"the SAE's hook_shape {sae.cfg.hook_shape} is not this model's z shape "
                            f"{tuple(shape)}; set cfg.hook_shape=(n_heads, d_head) or load the model it was trained on")
    return HookZ(layer, int(shape[0]), int(shape[1]))


def _heads_of(sae) -> tuple[int, int]:
    """``(n_heads, d_head)`` from the SAE's own config."""
    if len(sae.cfg.hook_shape) != 2:
        raise MismatchError(f"the SAE has hook_shape {sae.cfg.hook_shape}, not (n_heads, d_head); pass "
                            "the model (head_attribution(sae, model)) or train it on blocks.L.attn.hook_z")
    return int(sae.cfg.hook_shape[0]), int(sae.cfg.hook_shape[1])


def _latent_index(sae, latent: int) -> int:
    """``latent`` as an index in ``[0, d_sae)`` (negative ones count from the end);
    ``ConfigError`` when out of range."""
    if not -sae.cfg.d_sae <= latent < sae.cfg.d_sae:
        raise ConfigError(f"latent {latent} is out of range for d_sae={sae.cfg.d_sae}")
    return latent % sae.cfg.d_sae


# ---- head attribution ---------------------------------------------------------------------
@torch.no_grad()
def head_attribution(sae, model=None) -> Float[Tensor, "d_sae n_heads"]:
    """Share of each head in each latent's decoder row (Kissane et al. 2024; methods.md §6):

        share_i[h] = ‖d_i[h]‖ / Σ_h' ‖d_i[h']‖,   d_i[h] = W_dec[i, h·d_head:(h+1)·d_head]

    Rows sum to 1 (a latent with an all-zero decoder row gets all zeros). ``model`` is needed
    only when the SAE's config does not record ``hook_shape`` (e.g. a SAELens file); it is then
    checked against the model and filled in.
    """
    if model is not None:
        n_heads, d_head = check_hook_z_sae(model, sae)[1:]
    else:
        n_heads, d_head = _heads_of(sae)
    W_dec = einops.rearrange(sae.W_dec.float(), "s (h d) -> s h d", h=n_heads)  # [d_sae, n_heads, d_head]
    norms = W_dec.norm(dim=-1)  # [d_sae, n_heads]
    return norms / norms.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(norms.dtype).tiny)


# ---- direct feature attribution -----------------------------------------------------------
class DFA(NamedTuple):
    """Direct feature attribution of one latent at one destination token.

    ``by_head.sum() == by_source.sum() == x·W_enc[:, i]`` (x: the flattened z at dest), and
    ``x·W_enc[:, i] + bias = (x − b_dec)·W_enc[:, i] + b_enc[i]`` is the latent's
    pre-activation, before the sparsifier or the elementwise rule. For a Gated SAE it is the
    gate's, ``(x − b_dec)·W_enc[:, i] + b_gate[i]``, which decides whether the latent fires
    (its magnitude path, ``exp(r_mag[i])·(x − b_dec)·W_enc[:, i] + b_mag[i]``, is another
    affine function of the same projection)."""

    by_head: Float[Tensor, "n_heads"]  # noqa: F821 (a jaxtyping axis name, not a forward reference)
    """z_h[dest] · W_enc[h-block, i]."""
    by_source: Float[Tensor, "n_heads T"]
    """A_h[dest, src] · (v_h[src] · W_enc[h-block, i]); sums over src to ``by_head``."""
    bias: float
    """b_enc[i] − b_dec · W_enc[:, i] (gated: b_gate[i] − b_dec · W_enc[:, i]): the part of the
    pre-activation that no token supplies."""


def _as_tokens(model, tokens: Tensor | str) -> Tensor:
    if isinstance(tokens, str):
        tokens = model.to_tokens(tokens)  # [1, T], BOS prepended as the model's tokenizer does
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ConfigError(f"dfa takes one sequence, tokens [T] or [1, T]; got shape {tuple(tokens.shape)}")
    return tokens.to(model.cfg.device)


def _kv_head_index(n_heads: int, n_kv_heads: int) -> Tensor:
    """For each query head h, the key/value head it reads: ``h // (n_heads // n_kv_heads)``."""
    if n_heads % n_kv_heads:
        raise MismatchError(f"{n_heads} query heads do not split evenly over {n_kv_heads} key/value "
                            "heads; this attention layout is not supported")
    return torch.arange(n_heads) // (n_heads // n_kv_heads)


@torch.no_grad()
def dfa(model, sae, tokens: Tensor | str, latent: int, dest: int) -> DFA:
    """Direct feature attribution of ``latent`` at token ``dest`` of ``tokens`` ([T], [1, T]
    or a string, tokenized with BOS). With ``w_h = W_enc[h-block, i]`` and, from one forward
    pass, ``z`` (``hook_z``), ``A`` (``hook_pattern``) and ``v`` (``hook_v``):

        by_head[h]        = z_h[dest] · w_h
        by_source[h, src] = A_h[dest, src] · (v_{kv(h)}[src] · w_h)

    Since ``z_h[dest] = Σ_src A_h[dest, src] v_{kv(h)}[src]``, both sum to ``x·W_enc[:, i]``;
    with ``bias`` they sum to the latent's pre-activation (``DFA``; for a Gated SAE, the gate's).
    v includes the value bias (GPT-2's b_V sits in ``c_attn``; the bridge's ``hook_v`` is
    after it, and the pattern's rows sum to 1), so nothing is left over; measured:
    ``z == A@v`` to the last bit on tiny GPT-2 and grouped-query Llama bridges. An
    architecture where it does not hold (e.g. a learned attention sink that takes softmax
    mass without a value) triggers a warning: ``by_head`` stays exact, ``by_source`` does not.

    The SAE never sees the BOS position in training (``saekit.activations``), so ``dest=0``
    is off-distribution; BOS as a *source* is fine (and often large: an attention sink).
    """
    layer, n_heads, d_head = check_hook_z_sae(model, sae)
    i = _latent_index(sae, latent)
    tokens = _as_tokens(model, tokens)  # [1, T]
    T = tokens.shape[1]
    if not -T <= dest < T:
        raise ConfigError(f"dest={dest} is out of range for a sequence of {T} tokens")
    dest %= T

    names = [hook_z_name(layer), f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    missing = [n for n in names if n not in cache]
    if missing:
        raise MismatchError(f"this model's attention does not expose {missing}; DFA by source needs "
                            "hook_pattern and hook_v")
    z = cache[names[0]][0, dest].float()  # [n_heads, d_head]
    A = cache[names[1]][0, :, dest].float()  # [n_heads, T]  (hook_pattern: [batch, head, q, k])
    v = cache[names[2]][0].float()  # [T, n_kv_heads, d_head]  (hook_v: [batch, pos, head_kv, d_head])
    if z.shape != (n_heads, d_head) or A.shape != (n_heads, T) or v.shape[0] != T or v.shape[2] != d_head:
        raise MismatchError(f"unexpected attention shapes z {tuple(z.shape)}, pattern row {tuple(A.shape)}, "
                            f"v {tuple(v.shape)} for n_heads={n_heads}, d_head={d_head}, T={T}")
    v = v[:, _kv_head_index(n_heads, v.shape[1]).to(v.device)]  # [T, n_heads, d_head]

    w = einops.rearrange(sae.W_enc[:, i].float().to(z.device), "(h d) -> h d", h=n_heads)  # [n_heads, d_head]
    by_head = (z * w).sum(-1)  # [n_heads]
    by_source = A * einops.einsum(v, w, "t h d, h d -> h t")  # [n_heads, T]

    z_from_pattern = einops.einsum(A, v, "h t, t h d -> h d")  # [n_heads, d_head]
    if not torch.allclose(z_from_pattern, z, rtol=1e-3, atol=1e-5 * (1 + z.abs().max().item())):
        err = (z_from_pattern - z).abs().max().item()
        warnings.warn(f"hook_z differs from hook_pattern @ hook_v by up to {err:.3g} on this model; "
                      "DFA by_source does not sum to by_head", stacklevel=2)
    bias = (sae.b_enc[i] - sae.b_dec @ sae.W_enc[:, i]).item()
    return DFA(by_head.cpu(), by_source.cpu(), bias)


# ---- logit effects ------------------------------------------------------------------------
class LogitEffect(NamedTuple):
    """The tokens one latent's decoder direction directly boosts and suppresses most."""

    boosted: list[tuple[str, float]]
    """(token string, logit effect), largest first."""
    suppressed: list[tuple[str, float]]
    """(token string, logit effect), most negative first."""


class LogitEffects(NamedTuple):
    """Top boosted/suppressed token ids and their logit effects for many latents."""

    boosted_ids: Tensor  # [n_latents, top] int64
    boosted_values: Float[Tensor, "n_latents top"]
    suppressed_ids: Tensor  # [n_latents, top] int64
    suppressed_values: Float[Tensor, "n_latents top"]


def final_norm_linear(model, resid: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
    """The final norm's per-direction linear part: centre (LayerNorm only), times its weight.

    The per-token scale 1/σ is left out: it is a positive scalar that changes with the
    context, not with the direction, so it rescales but never reorders a latent's effects.
    The bias adds the same vector whatever the latent and is left out too. With weights
    processed by TransformerLens (``fold_ln``), the weight is already in ``W_U`` and the
    norm's weight is 1, so this stays correct."""
    ln = getattr(model, "ln_final", None)
    if ln is None:
        return resid
    if not getattr(ln, "uses_rms_norm", False):
        resid = resid - resid.mean(-1, keepdim=True)
    weight = getattr(ln, "weight", None)
    if weight is not None:
        weight = weight.float().to(resid.device)
        resid = resid * ((1.0 + weight) if getattr(ln, "uses_weight_offset", False) else weight)
    return resid


def latent_logits(model, sae, latents: Sequence[int] | Tensor, fold_ln: bool = True
                  ) -> Float[Tensor, "n_latents d_vocab"]:
    """Direct logit effect of a unit activation of each latent in ``latents``:

        u_i    = Σ_h d_i[h] @ W_O[h]     # d_i[h]: block h of W_dec[i]; W_O [n_heads, d_head, d_model]
        effect = norm(u_i) @ W_U         # W_U [d_model, d_vocab]

    This is the direct path only (later layers ignored), as in direct logit attribution.
    With ``fold_ln`` (default), ``norm`` is the final norm's linear part, centring for
    LayerNorm and its elementwise weight, see ``final_norm_linear``, i.e. the ``W_U`` that
    TransformerLens' ``fold_ln`` would give; its per-token scale 1/σ is ignored, as usual.
    With ``fold_ln=False`` the final norm is skipped entirely. ``b_O`` and ``b_U`` are
    left out: they do not depend on the latent. Returned on the CPU."""
    return _latent_logits(model, sae, latents, fold_ln).cpu()


@torch.no_grad()
def _latent_logits(model, sae, latents: Sequence[int] | Tensor, fold_ln: bool) -> Tensor:
    """``latent_logits`` on the model's device."""
    layer, n_heads, d_head = check_hook_z_sae(model, sae)
    W_O = model.blocks[layer].attn.W_O.float()  # [n_heads, d_head, d_model]
    W_U = model.W_U.float()  # [d_model, d_vocab]
    idx = torch.as_tensor(latents, dtype=torch.long).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= sae.cfg.d_sae):
        raise ConfigError(f"latents must lie in [0, {sae.cfg.d_sae}); "
                          f"got min {idx.min().item()}, max {idx.max().item()}")
    if W_O.shape != (n_heads, d_head, W_U.shape[0]):
        raise MismatchError(f"W_O of layer {layer} has shape {tuple(W_O.shape)}, expected "
                            f"({n_heads}, {d_head}, {W_U.shape[0]}); this attention layout is not supported")
    d = einops.rearrange(sae.W_dec[idx.to(sae.W_dec.device)].float().to(W_O.device),
                         "n (h d) -> n h d", h=n_heads)  # [n, n_heads, d_head]
    resid = einops.einsum(d, W_O, "n h d, h d m -> n m")  # [n, d_model]
    if fold_ln:
        resid = final_norm_linear(model, resid)
    return resid @ W_U  # [n, d_vocab]


def _token_strings(model, ids: Tensor) -> list[str]:
    return model.tokenizer.batch_decode([[t] for t in ids.tolist()])


def logit_effect(model, sae, latent: int, top: int = 10, fold_ln: bool = True) -> LogitEffect:
    """The ``top`` tokens latent ``latent`` most boosts and suppresses through the direct path
    (``latent_logits``: W_dec[i] per head, through W_O, summed, final norm's linear part, W_U)."""
    i = _latent_index(sae, latent)
    effect = latent_logits(model, sae, [i], fold_ln)[0]  # [d_vocab]
    top = min(top, effect.numel())
    up, down = effect.topk(top), effect.topk(top, largest=False)
    return LogitEffect(list(zip(_token_strings(model, up.indices), up.values.tolist())),
                       list(zip(_token_strings(model, down.indices), down.values.tolist())))


def logit_effects(model, sae, top: int = 10, fold_ln: bool = True, chunk: int = 1024) -> LogitEffects:
    """``logit_effect`` for every latent, as token ids and values. Latents go ``chunk`` at a
    time so memory stays at ``chunk × d_vocab`` floats (GPT-2: 1024 × 50257 ≈ 200 MB)."""
    check_hook_z_sae(model, sae)
    parts = []
    for s in range(0, sae.cfg.d_sae, chunk):
        effect = _latent_logits(model, sae, range(s, min(s + chunk, sae.cfg.d_sae)), fold_ln)  # [c, d_vocab]
        k = min(top, effect.shape[1])
        up, down = effect.topk(k, dim=1), effect.topk(k, dim=1, largest=False)
        parts.append(tuple(t.cpu() for t in (up.indices, up.values, down.indices, down.values)))
    return LogitEffects(*(torch.cat(p) for p in zip(*parts)))
