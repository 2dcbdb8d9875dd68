"""Gemma Scope's ``params.npz`` (Lieberum et al. 2024) as a saekit ``jumprelu`` SAE.

Gemma Scope's JumpReLU SAE (the release's tutorial ``JumpReLUSAE``; SAELens's ``gemma_2``
loader says ``apply_b_dec_to_input: false``) computes, with no ``b_dec`` subtracted first::

    p = x W_enc + b_enc;   f = ReLU(p) ⊙ 1[p > threshold];   x̂ = f W_dec + b_dec

saekit's jumprelu computes ``p' = (x − b_dec) W_enc + b_enc'`` and ``f = p' ⊙ 1[p' > θ]``, so the
file is folded exactly (in float64): ``b_enc' = b_enc + b_dec W_enc`` (then ``p' = p``) and
``θ = max(threshold, 0)`` (where ``p > threshold`` and ``p ≤ 0`` ReLU gives 0, as ``p > max(threshold, 0)``
does). The arrays are ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec`` and
``threshold`` (``w_enc``/``w_dec`` are read too, as SAELens reads them).

The file names neither hook nor model. ``load_sae(path, hook_name=..., model_name=...)`` takes
them from the caller; otherwise they are read from the release's path, which the Hub's cache
(and a ``hf://`` path) keeps: a component ``gemma-scope-<size>-<pt|it>-<res|mlp|att>`` (also as
the cache's ``models--google--gemma-scope-2b-pt-res``) gives the model ``google/gemma-2-<size>``
(``-it`` for it) and the site, ``layer_<L>`` the layer: ``res`` → ``blocks.L.hook_resid_post``,
``mlp`` → ``blocks.L.hook_mlp_out``, ``att`` → ``blocks.L.attn.hook_z``. A path that says neither
(and no hook_name given) is refused.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from saekit.errors import SAEFileError

PARAMS = "params.npz"
_RELEASE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)")
_SITES = {"res": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "att": "blocks.{}.attn.hook_z"}
_ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def hook_and_model(path: Path) -> tuple[str, str] | None:
    """(hook_name, model_name) read from a Gemma Scope release path, or None."""
    release = layer = None
    for part in Path(path).parts:
        release = _RELEASE.search(part) or release
        m = re.fullmatch(r"layer_(\d+)", part)
        layer = int(m[1]) if m else layer
    if release is None or layer is None:
        return None
    size, kind, site = release.groups()
    return _SITES[site].format(layer), f"google/gemma-2-{size}" + ("-it" if kind == "it" else "")


def _arrays(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.asarray(data[k], np.float64))
                      for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SAEFileError(f"{path} is corrupt or not a .npz file ({e}); download it again") from None
    missing = [n for n in _ARRAYS if n not in arrays]
    if missing:
        raise SAEFileError(f"{path} has no {', '.join(missing)} array{'s' if len(missing) > 1 else ''}; Gemma Scope's "
                           f"params.npz holds {', '.join(_ARRAYS)}")
    return arrays


def from_gemma_scope(path: Path, hook_name: str | None = None, model_name: str | None = None) -> tuple[dict, dict]:
    """saekit's config dict and folded weights of the Gemma Scope ``params.npz`` at ``path``."""
    a = _arrays(path)
    if a["W_enc"].ndim != 2:
        raise SAEFileError(f"{path}: W_enc has shape {tuple(a['W_enc'].shape)}, not [d_in, d_sae]")
    d_in, d_sae = a["W_enc"].shape
    want = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for n, shape in want.items():
        if tuple(a[n].shape) != shape:
            raise SAEFileError(f"{path}: {n} has shape {tuple(a[n].shape)}, but W_enc {(d_in, d_sae)} implies {shape}")
    found = hook_and_model(path)
    if hook_name is None and found is None:
        raise SAEFileError(f"{path}: a Gemma Scope params.npz names no hook; pass load_sae(..., hook_name=..., "
                           "model_name=...) or keep it under its release path (gemma-scope-2b-pt-res/layer_12/...)")
    hook_name = hook_name or found[0]
    model_name = model_name if model_name is not None else (found[1] if found else "")
    w = {"W_enc": a["W_enc"], "b_enc": a["b_enc"] + a["b_dec"] @ a["W_enc"], "W_dec": a["W_dec"],
         "b_dec": a["b_dec"], "threshold": a["threshold"].clamp_min(0)}
    cfg = {"d_in": int(d_in), "d_sae": int(d_sae), "k": min(32, int(d_sae)), "sparsity": "jumprelu",
           "hook_name": hook_name, "model_name": model_name}
    return cfg, {n: t.float() for n, t in w.items()}
