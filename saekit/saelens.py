"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``) to and from saekit's TopK SAE.

saekit's SAE computes ``x̂ = TopK_ReLU((x − b_dec) W_enc + b_enc) W_dec + b_dec``. SAELens's TopK
SAE (v6 ``sae_lens/saes/topk_sae.py`` and ``saes/sae.py``; v5 ``sae_lens/sae.py``) computes, with
``s`` the input scale, ``n_i = ‖W_dec[i]‖`` and ``φ`` v5's fine-tuning scale::

    h = (s·x − [apply_b_dec_to_input]·b_dec) W_enc + b_enc
    h ← h ⊙ n                               if rescale_acts_by_decoder_norm
    f = TopK_ReLU(h)                          # top k of h, then ReLU of the kept values
    x̂ = (((f ⊘ n if rescale) ⊙ φ) W_dec + b_dec) / s

Each setting is either **honoured exactly**, by rewriting the weights (in float64) so that
saekit's formula gives the same ``h`` (so the sparsifier ranks the same numbers and keeps the
same latents), the same ``f`` and the same ``x̂``, or the folder is **refused** with a one-line
``SAEFileError`` naming the setting:

- ``apply_b_dec_to_input`` false, honoured: ``b_enc ← b_enc + b_dec W_enc`` (saekit then
  subtracts ``b_dec W_enc`` back).
- ``rescale_acts_by_decoder_norm`` true, honoured (SAELens's own ``_fold_norm_topk``):
  ``W_enc[:, i] ← n_i W_enc[:, i]``, ``b_enc ← n ⊙ b_enc``, ``W_dec[i] ← W_dec[i] / n_i``. Ranking
  ``h ⊙ n`` is what SAELens's selection does, so the same latents win. Refused when a decoder
  row is zero (SAELens then divides 0 by 0).
- ``normalize_activations``: ``"none"`` (v5: false) needs nothing. ``"expected_average_only_in"``
  (v5: true) never scales at run time in SAELens; its trainers feed ``s·x`` and divide the
  output by ``s`` (v6 ``ActivationScaler``, v5 ``ActivationsStore``), then fold ``s`` into the
  weights and drop the factor (``fold_activation_norm_scaling_factor``) before the final save.
  So a factor stored beside the weights (v6 checkpoints: ``activation_scaler.json``; v5:
  ``estimated_norm_scaling_factor`` in ``activations_store_state.safetensors``) means unfolded
  weights: honoured by the same fold, ``W_enc ← s·W_enc``, ``W_dec ← W_dec / s``,
  ``b_dec ← b_dec / s``. Without one the folder cannot say whether ``s`` is already folded
  in (v5's final checkpoints) or still missing (hub releases, whose factor lives in SAELens's
  directory): refused. ``"constant_norm_rescale"`` and ``"layer_norm"`` rescale each token
  and undo it on the output, which no weights reproduce: refused.
- ``scaling_factor`` tensor (v5 ``finetuning_scaling_factor``): ≈ ones, dropped as SAELens
  drops it; otherwise, with ``finetuning_scaling_factor`` true, honoured: ``W_dec[i] ← φ_i W_dec[i]``;
  with it false, refused (as SAELens refuses).
- ``architecture`` other than ``"topk"`` (pre-6 cfgs: ``"standard"`` with ``activation_fn``
  ``"topk"``), ``activation_fn_kwargs`` other than ``k``, a non-null ``hook_head_index`` (the
  SAE reads one head's slice of the hook): refused.
- ``dtype``: the weights are loaded as float32 (SAELens computes in the cfg's dtype).
  ``reshape_activations`` ``"hook_z"`` is saekit's own flattening of heads. Every other key
  (metadata, dataset, context size, training hyperparameters) does not change the function
  and is ignored.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from saekit.errors import SAEFileError
from saekit.files import read_json
from saekit.hooks import hook_z_layer

SCALER_V6 = "activation_scaler.json"
STORE_V5 = "activations_store_state.safetensors"
_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


def to_saelens(cfg: dict) -> dict:
    """The SAELens 6 ``cfg.json`` of a saekit TopK SAE with config dict ``cfg``."""
    return {
        "architecture": "topk", "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "k": cfg["k"],
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        # explicit: SAELens's training config defaults it to true (the inference one to false)
        "rescale_acts_by_decoder_norm": False,
        "reshape_activations": "hook_z" if hook_z_layer(cfg["hook_name"]) is not None else "none",
        # sae_lens_version marks the v6 layout; without it SAELens reads a pre-6 cfg and
        # keeps only top-level metadata keys, losing hook_name and model_name
        "metadata": {"model_name": cfg["model_name"], "hook_name": cfg["hook_name"],
                     "sae_lens_version": "6.0.0", "saekit": cfg},
    }


def from_saelens(cfg: dict, w: dict, folder: Path) -> tuple[dict, dict]:
    """saekit's config dict and the (folded) weights of the SAELens folder ``folder``."""
    meta = cfg.get("metadata") or {}
    k = _topk_k(cfg, folder)
    head = cfg.get("hook_head_index")
    head = meta.get("hook_head_index") if head is None else head
    if head is not None:
        raise SAEFileError(f"{folder}: hook_head_index={head}: the SAE reads one attention head's slice "
                           "of its hook, and saekit splices whole hooks; run it with SAELens")
    if "saekit" in meta:  # written by saekit: its own config, under the settings SAELens runs
        out = {**meta["saekit"], "sparsity": "topk"}
    else:
        out = {"hook_name": meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point", ""))),
               "model_name": meta.get("model_name", cfg.get("model_name", ""))}
    out.update(d_in=cfg["d_in"], d_sae=cfg["d_sae"], k=k)
    return out, _fold(cfg, dict(w), folder)


def _topk_k(cfg: dict, folder: Path) -> int:
    """``k`` of a TopK SAE in a v6 (``architecture: topk``) or pre-6 (``activation_fn: topk``) cfg."""
    arch = cfg.get("architecture")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    if arch not in (None, "standard", "topk") or act not in (None, "topk") or (arch != "topk" and act is None):
        what = f"architecture {arch!r}" + (f" with activation_fn {act!r}" if act is not None else "")
        raise SAEFileError(f"{folder}: SAELens {what} is not a TopK SAE; saekit loads TopK SAEs")
    kwargs = dict(cfg.get("activation_fn_kwargs") or {})
    k2 = kwargs.pop("k", None)
    if kwargs:
        raise SAEFileError(f"{folder}: activation_fn_kwargs {sorted(kwargs)} are not understood "
                           "(saekit's TopK takes only k); remove them if they do not change the function")
    k = cfg.get("k")
    if k is not None and k2 is not None and k != k2:
        raise SAEFileError(f"{folder}: cfg.json gives k={k} and activation_fn_kwargs k={k2}; make them agree")
    if k is None and k2 is None:
        raise SAEFileError(f'{folder}: cfg.json of this SAELens TopK SAE gives no k; add "k": <latents per token>')
    return int(k if k is not None else k2)


def _flag(cfg: dict, key: str, default: bool, folder: Path) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):  # SAELens multiplies b_dec by it: 0.5 would halve b_dec
        raise SAEFileError(f"{folder}: cfg.json's {key} must be true or false, not {v!r}")
    return v


def _input_scale(cfg: dict, folder: Path) -> float | None:
    """The expected_average_only_in factor ``s`` still to fold, None for no normalization."""
    mode = cfg.get("normalize_activations")
    mode = {None: "none", False: "none", True: "expected_average_only_in"}.get(mode, mode)  # v5: a bool
    if mode == "none":
        return None
    if mode in ("constant_norm_rescale", "layer_norm"):
        raise SAEFileError(f"{folder}: normalize_activations={mode!r} rescales each token at run time, which "
                           "saekit's SAE does not do; saekit loads 'none' and 'expected_average_only_in'")
    if mode != "expected_average_only_in":
        raise SAEFileError(f"{folder}: unknown normalize_activations {mode!r}; SAELens's are 'none', "
                           "'expected_average_only_in', 'constant_norm_rescale' and 'layer_norm'")
    s, source = _stored_scale(folder)
    if s is None:
        raise SAEFileError(f"{folder}: normalize_activations='expected_average_only_in' but no scaling factor is "
                           "stored beside it, so it may or may not be folded into the weights; set it to 'none' if "
                           f'it is, else write {SCALER_V6} holding {{"scaling_factor": s}}')
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        raise SAEFileError(f"{source}: scaling_factor must be a positive number, not {s!r}")
    return float(s)


def _stored_scale(folder: Path) -> tuple[object, Path | None]:
    """(factor, file) from a SAELens 6 or 5 trainer checkpoint beside the weights, or (None, None)."""
    if (folder / SCALER_V6).is_file():
        s = read_json(folder / SCALER_V6).get("scaling_factor")
        if s is not None:
            return s, folder / SCALER_V6
    if (folder / STORE_V5).is_file():
        try:
            with safe_open(str(folder / STORE_V5), framework="pt") as f:  # reads one tensor, not the buffer
                if "estimated_norm_scaling_factor" in f.keys():
                    return f.get_tensor("estimated_norm_scaling_factor").item(), folder / STORE_V5
        except (SafetensorError, OSError) as e:
            raise SAEFileError(f"{folder / STORE_V5} is corrupt ({e}); delete it or re-save the checkpoint") from None
    return None, None


def _fold(cfg: dict, w: dict, folder: Path) -> dict:
    """Rewrite SAELens's weights so saekit's formula computes SAELens's function (module docstring)."""
    apply_b_dec = _flag(cfg, "apply_b_dec_to_input", True, folder)
    rescale = _flag(cfg, "rescale_acts_by_decoder_norm", False, folder)
    s = _input_scale(cfg, folder)
    phi = w.pop("scaling_factor", None)
    if phi is not None and torch.allclose(phi.float(), torch.ones_like(phi, dtype=torch.float32)):
        phi = None  # SAELens deletes an all-ones scaling_factor
    if phi is not None and not _flag(cfg, "finetuning_scaling_factor", False, folder):
        raise SAEFileError(f"{folder}: the weights hold a scaling_factor tensor other than ones but cfg.json's "
                           "finetuning_scaling_factor is false (SAELens refuses this too); set it to true if it "
                           "belongs to the SAE")
    if apply_b_dec and not rescale and s is None and phi is None:
        return w  # nothing to fold: the tensors as stored, bit for bit
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if any(n not in w or tuple(w[n].shape) != shapes[n] for n in _WEIGHTS) or (
            phi is not None and tuple(phi.shape) != (d_sae,)):
        return w  # load_sae names the missing or misshapen tensor
    W_enc, b_enc, W_dec, b_dec = (w[n].double() for n in _WEIGHTS)
    if not apply_b_dec:  # (x − b_dec) W_enc + (b_enc + b_dec W_enc) = x W_enc + b_enc
        b_enc = b_enc + b_dec @ W_enc
    if rescale:
        n = W_dec.norm(dim=1)
        if (n == 0).any():
            zero = (n == 0).nonzero().flatten().tolist()
            raise SAEFileError(f"{folder}: rescale_acts_by_decoder_norm divides by the decoder row norms, and latent "
                               f"{zero[0]}'s row is zero ({len(zero)} such rows), where SAELens gives NaN; remove "
                               "those latents")
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    if phi is not None:  # (f ⊙ φ) W_dec = f (φ ⊙ W_dec)
        W_dec = W_dec * phi.double()[:, None]
    if s is not None:  # (x − b_dec/s)(s·W_enc) = (s·x − b_dec) W_enc; output (f W_dec + b_dec)/s
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
    return {**w, **{n: t.float() for n, t in zip(_WEIGHTS, (W_enc, b_enc, W_dec, b_dec))}}
