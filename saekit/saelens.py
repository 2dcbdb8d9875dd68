"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``) to and from saekit's SAE.

saekit's SAE computes ``x̂ = f W_dec + b_dec`` with ``f`` its architecture's rule applied to
``h = (x − b_dec) W_enc`` (saekit/sae.py). SAELens's inference SAEs (v6 ``sae_lens/saes/*.py``,
read at 6.54; v5 ``sae_lens/sae.py``, whose ``encode_*`` are the same) compute, with ``s`` the
input scale, ``a`` = ``apply_b_dec_to_input``, ``n_i = ‖W_dec[i]‖`` and ``φ`` v5's fine-tuning
scale::

    u = s·x − a·b_dec
    standard  f = ReLU(u W_enc + b_enc)
    jumprelu  f = ReLU(p) ⊙ 1[p > threshold],  p = u W_enc + b_enc
    gated     f = 1[u W_enc + b_gate > 0] ⊙ ReLU(u (W_enc ⊙ exp(r_mag)) + b_mag)
    topk      f = TopK_ReLU(h'),  h' = (u W_enc + b_enc) ⊙ n if rescale_acts_by_decoder_norm
    x̂ = (((f ⊘ n if topk and rescale) ⊙ φ) W_dec + b_dec) / s

Each setting is either **honoured exactly**, by rewriting the weights (in float64) so that
saekit's formula gives the same pre-activations (so TopK ranks the same numbers and keeps
the same latents), the same ``f`` and the same ``x̂``, or the folder is **refused** with a
one-line ``SAEFileError`` naming the setting:

- ``architecture``: ``standard``, ``jumprelu``, ``gated`` and ``topk`` load as saekit's
  architecture of that name. ``batchtopk`` and ``matryoshka_batchtopk`` exist in SAELens only
  as training classes; their inference save is a ``jumprelu`` folder whose thresholds all
  equal the trained ``topk_threshold`` (``BatchTopKTrainingSAE.process_state_dict_for_saving_inference``),
  which loads as any jumprelu folder; a training checkpoint (cfg ``batchtopk``, a
  ``topk_threshold`` scalar) loads as that same jumprelu SAE. Pre-6 cfgs (no
  ``sae_lens_version`` of 6 or more) name TopK as ``standard`` with ``activation_fn`` ``topk``;
  a v6 cfg saying so runs as ReLU in SAELens 6, which ignores ``activation_fn``: refused as
  contradictory. Any other architecture (``abstopk``, transcoders, ...) or ``activation_fn``
  other than ReLU (TopK's: ``topk``): refused.
- ``threshold`` (jumprelu): SAELens keeps ``ReLU(p)`` where ``p > threshold``, saekit ``p``;
  the two agree once a negative threshold is raised to 0: ``threshold ← max(threshold, 0)``.
- ``apply_b_dec_to_input`` false, honoured: ``b_enc ← b_enc + b_dec W_enc`` (saekit then
  subtracts ``b_dec W_enc`` back); gated: ``b_gate ← b_gate + b_dec W_enc`` and
  ``b_mag ← b_mag + exp(r_mag) ⊙ (b_dec W_enc)``.
- ``rescale_acts_by_decoder_norm`` is a field of SAELens's TopK configs only (inference
  default false, training default true, so batchtopk checkpoints default to true); the other
  architectures drop it, and so does saekit. True, honoured (SAELens's own ``_fold_norm_topk``):
  ``W_enc[:, i] ← n_i W_enc[:, i]``, ``b_enc ← n ⊙ b_enc``, ``W_dec[i] ← W_dec[i] / n_i``. Ranking
  ``h ⊙ n`` is what SAELens's selection does, so the same latents win; a batchtopk threshold
  is already in those units. Refused when a decoder row is zero (SAELens then divides 0 by 0).
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
  and undo it on the output, which no weights reproduce, and ``"covariance_whitening"``
  needs statistics the folder does not hold: refused.
- ``scaling_factor`` tensor (v5 ``finetuning_scaling_factor``): ≈ ones, dropped as SAELens
  drops it; otherwise, with ``finetuning_scaling_factor`` true, honoured: ``W_dec[i] ← φ_i W_dec[i]``;
  with it false, refused (as SAELens refuses).
- ``hook_head_index`` non-null (the SAE reads one head's slice of the hook): refused.
  ``activation_fn_kwargs`` other than TopK's ``k``: refused.
- ``reshape_activations`` ``"hook_z"`` is saekit's own flattening of heads (``[.., n_heads,
  d_head] → [.., d_in]``); a ``d_head`` in the cfg gives ``hook_shape = (d_in / d_head,
  d_head)``, else the model fills it in at use (``splice.check_sae_fits``). ``"hook_z"`` on a
  hook that is not a ``hook_z`` is refused, as SAELens refuses it.
- ``hook_name`` and ``model_name`` come from ``metadata`` (v6) or the top level (v5, where
  ``hook_point`` is the older name). ``dtype``: the weights are loaded as float32 (SAELens
  computes in the cfg's dtype). Every other key (dataset, context size, training
  hyperparameters, ``sparsity.safetensors`` beside the weights) does not change the function
  and is ignored.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from saekit.errors import SAEFileError
from saekit.files import SAELENS_WEIGHTS, read_json
from saekit.hooks import hook_z_layer

SCALER_V6 = "activation_scaler.json"
STORE_V5 = "activations_store_state.safetensors"
_BASE = ("W_enc", "b_enc", "W_dec", "b_dec")
# SAELens architecture -> the tensors its file holds
_TENSORS = {"standard": _BASE, "topk": _BASE, "jumprelu": _BASE + ("threshold",),
            "gated": ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"),
            "batchtopk": _BASE + ("topk_threshold",), "matryoshka_batchtopk": _BASE + ("topk_threshold",)}
_TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")  # configs with rescale_acts_by_decoder_norm
# saekit sparsity -> SAELens architecture it is saved as (threshold inference for the batch-level rules)
_SAVED_AS = {"topk": "topk", "gtopk": "topk", "standard": "standard", "jumprelu": "jumprelu", "gated": "gated",
             "mutual_choice": "jumprelu", "batchtopk": "jumprelu", "matryoshka": "jumprelu",
             "feature_choice": "jumprelu"}


# ---- save -------------------------------------------------------------------------------------

def to_saelens(cfg: dict, state: dict) -> tuple[dict, dict]:
    """The SAELens 6 ``cfg.json`` and weights of a saekit SAE with config dict ``cfg`` and state
    dict ``state``: topk and gtopk (its label-free rule) as ``topk``; standard, jumprelu, gated
    as themselves; the threshold rules of mutual_choice, batchtopk, matryoshka and
    feature_choice as ``jumprelu`` with ``threshold`` = their θ over every latent."""
    sparsity, d_sae = cfg["sparsity"], cfg["d_sae"]
    arch = _SAVED_AS.get(sparsity)
    if arch is None:
        raise SAEFileError(f"SAELens has no {sparsity!r} architecture; save with format='saekit'")
    w = {n: state[n] for n in _TENSORS[arch] if n in state}
    if arch == "jumprelu" and sparsity != "jumprelu":
        if (cfg.get("variant") or {}).get("mc_mode") == "batch" and sparsity != "feature_choice":
            raise SAEFileError(f"a {sparsity} SAE with mc_mode='batch' selects across the batch at inference, "
                               "which SAELens cannot; set cfg.variant.mc_mode='threshold' or save with format='saekit'")
        w["threshold"] = state["sparsifier.theta"].float().expand(d_sae).clone()
    if arch == "jumprelu" and (w["threshold"] < 0).any():
        raise SAEFileError("SAELens's jumprelu keeps ReLU(pre) where pre > threshold, which differs from saekit's "
                           "pre where a threshold is negative; raise the thresholds to 0 or save with format='saekit'")
    out = {"architecture": arch, "d_in": cfg["d_in"], "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "hook_z" if hook_z_layer(cfg["hook_name"]) is not None else "none",
           # sae_lens_version marks the v6 layout; without it SAELens reads a pre-6 cfg and
           # keeps only top-level metadata keys, losing hook_name and model_name
           "metadata": {"model_name": cfg["model_name"], "hook_name": cfg["hook_name"],
                        "sae_lens_version": "6.0.0", "saekit": cfg}}
    if arch == "topk":  # explicit: SAELens's training config defaults it to true (the inference one to false)
        out.update(k=cfg["k"], rescale_acts_by_decoder_norm=False)
    return out, w


# ---- load -------------------------------------------------------------------------------------

def from_saelens(cfg: dict, w: dict, folder: Path) -> tuple[dict, dict]:
    """saekit's config dict and the (folded) weights of the SAELens folder ``folder``."""
    meta = cfg.get("metadata") or {}
    arch, k = _architecture(cfg, folder)
    head = cfg.get("hook_head_index")
    head = meta.get("hook_head_index") if head is None else head
    if head is not None:
        raise SAEFileError(f"{folder}: hook_head_index={head}: the SAE reads one attention head's slice "
                           "of its hook, and saekit splices whole hooks; run it with SAELens")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    if "saekit" in meta:  # written by saekit: its own config, under the settings SAELens runs
        out = dict(meta["saekit"])
    else:
        hook = meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point", "")))
        out = {"hook_name": hook, "model_name": meta.get("model_name", cfg.get("model_name", "")),
               "hook_shape": _hook_shape(cfg, hook, folder)}
    sparsity = "jumprelu" if arch in _TOPK_FAMILY[1:] else arch
    # k is TopK's; the other architectures keep saekit's default where it fits
    k = k if arch == "topk" else min(int(out.get("k", 32)), d_sae)
    out.update(d_in=d_in, d_sae=d_sae, k=k, sparsity=sparsity)
    return out, _fold(cfg, _checked(w, arch, d_in, d_sae, folder), arch, folder)


def _architecture(cfg: dict, folder: Path) -> tuple[str, int | None]:
    """SAELens's architecture (pre-6 ``standard`` + ``activation_fn: topk`` is ``topk``) and TopK's k."""
    arch = cfg.get("architecture")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    if arch in (None, "standard") and act == "topk" and not _is_v6(cfg):  # v6 would run it as ReLU: refused
        arch = "topk"
    arch = "standard" if arch is None else arch
    if arch not in _TENSORS:
        raise SAEFileError(f"{folder}: SAELens architecture {arch!r} is not one saekit loads; it loads "
                           "standard, jumprelu, gated, topk and batchtopk (saved as jumprelu)")
    if act is not None and act != ("topk" if arch == "topk" else "relu"):
        raise SAEFileError(f"{folder}: SAELens architecture {arch!r} with activation_fn {act!r} is not one saekit "
                           f"loads; its {arch} SAE uses {'topk' if arch == 'topk' else 'relu'}")
    kwargs = dict(cfg.get("activation_fn_kwargs") or {})
    k2 = kwargs.pop("k", None) if arch == "topk" else None
    if kwargs:
        takes = "TopK takes only k" if arch == "topk" else f"{arch} takes none"
        raise SAEFileError(f"{folder}: activation_fn_kwargs {sorted(kwargs)} are not understood (saekit's {takes}); "
                           "remove them if they do not change the function")
    if arch != "topk":
        return arch, None
    k = cfg.get("k")
    if k is not None and k2 is not None and k != k2:
        raise SAEFileError(f"{folder}: cfg.json gives k={k} and activation_fn_kwargs k={k2}; make them agree")
    if k is None and k2 is None:
        raise SAEFileError(f'{folder}: cfg.json of this SAELens TopK SAE gives no k; add "k": <latents per token>')
    return arch, int(k if k is not None else k2)


def _is_v6(cfg: dict) -> bool:
    """SAELens's own test (``handle_config_defaulting``): a sae_lens_version of 6 or more, at the top or in metadata."""
    v = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version") or ""
    major = re.match(r"\d+", str(v))
    return major is not None and int(major[0]) >= 6


def _hook_shape(cfg: dict, hook: str, folder: Path) -> tuple[int, ...]:
    """(n_heads, d_head) when the cfg says d_head; () otherwise (the model fills it in at use)."""
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", "hook_z"):
        raise SAEFileError(f"{folder}: unknown reshape_activations {reshape!r}; SAELens's are 'none' and 'hook_z'")
    if reshape == "hook_z" and hook and not hook.endswith("_z"):
        raise SAEFileError(f"{folder}: reshape_activations='hook_z' on hook {hook!r}, which has no heads "
                           "(SAELens refuses this too); set it to 'none'")
    d_head, d_in = cfg.get("d_head"), cfg["d_in"]
    if d_head is None or hook_z_layer(hook) is None:
        return ()
    if not isinstance(d_head, int) or d_head < 1 or d_in % d_head:
        raise SAEFileError(f"{folder}: d_head={d_head!r} does not divide d_in={d_in}; fix or remove d_head")
    return (d_in // d_head, d_head)


def _checked(w: dict, arch: str, d_in: int, d_sae: int, folder: Path) -> dict:
    """``w`` with ``log_threshold`` (a training checkpoint's) as ``threshold``, after checking that the
    architecture's tensors are all there with the shapes cfg.json implies."""
    if arch == "jumprelu" and "threshold" not in w and "log_threshold" in w:
        w = {**w, "threshold": w["log_threshold"].exp()}
        del w["log_threshold"]
    names = _TENSORS[arch]
    missing = [n for n in names if n not in w]
    if missing:
        raise SAEFileError(f"{folder}: {SAELENS_WEIGHTS} lacks {missing}, which a SAELens {arch} SAE holds; "
                           "re-save the SAE")
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "topk_threshold": ()}
    for n in names:
        want = shapes.get(n, (d_sae,))
        if tuple(w[n].shape) != want:
            raise SAEFileError(f"{folder}: tensor {n} has shape {tuple(w[n].shape)}, cfg.json implies {want} "
                               f"(d_in={d_in}, d_sae={d_sae}); fix cfg.json or the weights")
    return w


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
    if mode == "covariance_whitening":
        raise SAEFileError(f"{folder}: normalize_activations='covariance_whitening' needs the whitening statistics, "
                           "which SAELens folds into the weights before its final save; load that folded save")
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


def _fold(cfg: dict, w: dict, arch: str, folder: Path) -> dict:
    """Rewrite SAELens's weights so saekit's formula computes SAELens's function (module docstring)."""
    apply_b_dec = _flag(cfg, "apply_b_dec_to_input", True, folder)
    rescale = arch in _TOPK_FAMILY and _flag(cfg, "rescale_acts_by_decoder_norm", arch != "topk", folder)
    s = _input_scale(cfg, folder)
    phi = w.pop("scaling_factor", None)
    if phi is not None and torch.allclose(phi.float(), torch.ones_like(phi, dtype=torch.float32)):
        phi = None  # SAELens deletes an all-ones scaling_factor
    if phi is not None and not _flag(cfg, "finetuning_scaling_factor", False, folder):
        raise SAEFileError(f"{folder}: the weights hold a scaling_factor tensor other than ones but cfg.json's "
                           "finetuning_scaling_factor is false (SAELens refuses this too); set it to true if it "
                           "belongs to the SAE")
    if phi is not None and tuple(phi.shape) != (cfg["d_sae"],):
        raise SAEFileError(f"{folder}: tensor scaling_factor has shape {tuple(phi.shape)}, cfg.json implies "
                           f"({cfg['d_sae']},); fix cfg.json or the weights")
    if "topk_threshold" in w:  # SAELens's own inference save: one threshold for every latent
        w["threshold"] = w.pop("topk_threshold").double().expand(cfg["d_sae"])
    if "threshold" in w:
        w["threshold"] = w["threshold"].double().clamp_min(0).float()
    if apply_b_dec and not rescale and s is None and phi is None:
        return w  # nothing to fold: the tensors as stored, bit for bit
    t = {n: w[n].double() for n in w}
    if not apply_b_dec:  # (x − b_dec) W_enc + (b + b_dec W_enc) = x W_enc + b
        shift = t["b_dec"] @ t["W_enc"]
        if arch == "gated":
            t["b_gate"], t["b_mag"] = t["b_gate"] + shift, t["b_mag"] + t["r_mag"].exp() * shift
        else:
            t["b_enc"] = t["b_enc"] + shift
    if rescale:
        n = t["W_dec"].norm(dim=1)
        if (n == 0).any():
            zero = (n == 0).nonzero().flatten().tolist()
            raise SAEFileError(f"{folder}: rescale_acts_by_decoder_norm divides by the decoder row norms, and latent "
                               f"{zero[0]}'s row is zero ({len(zero)} such rows), where SAELens gives NaN; remove "
                               "those latents")
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
    if phi is not None:  # (f ⊙ φ) W_dec = f (φ ⊙ W_dec)
        t["W_dec"] = t["W_dec"] * phi.double()[:, None]
    if s is not None:  # (x − b_dec/s)(s·W_enc) = (s·x − b_dec) W_enc; output (f W_dec + b_dec)/s
        t["W_enc"], t["W_dec"], t["b_dec"] = t["W_enc"] * s, t["W_dec"] / s, t["b_dec"] / s
    return {n: v.float() for n, v in t.items()}
