"""Kissane et al.'s (2024) attention-output SAEs as saekit ``standard`` SAEs.

Their repository (``common/torch_modules/autoencoder.py``, ``AutoEncoder.save`` and
``load_from_hf``) and Hugging Face releases store each SAE as ``NAME.pt``, a torch state dict
``W_enc [act_size, dict_size]``, ``W_dec [dict_size, act_size]``, ``b_enc``, ``b_dec``, with
``NAME_cfg.json`` beside it (``act_size``, ``dict_size``, ``act_name`` such as
``blocks.5.attn.hook_z``, ``site`` ``"z"``, ``layer``, ``model_name``, ``concat_heads``,
``enc_dtype``, training settings). ``AutoEncoder.forward`` computes::

    f = ReLU((x − b_dec) W_enc + b_enc);   x̂ = f W_dec + b_dec

with ``x`` the heads' z concatenated (``concat_heads``: ``[.., n_heads, d_head] → [.., n_heads·d_head]``),
which is saekit's ``standard`` SAE on ``act_name`` as it is: no fold. The cfg records no head
count: ``hook_shape = (n_heads, d_head)`` comes from ``n_heads`` or ``d_head`` in the cfg when
present, else from the model (GPT-2 small: 12 heads; 2L GELU: 8), else the model fills it in
at use (``splice.check_sae_fits``). ``model_name`` ``gpt2-small`` (TransformerLens's alias)
becomes ``gpt2``, the Hub name saekit loads. The ``.pt`` is read with
``torch.load(weights_only=True)``: tensors only, no pickled code. A per-head SAE
(``concat_heads`` false on a head site) reads one head's slice: refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from saekit.errors import SAEFileError
from saekit.files import read_json
from saekit.hooks import hook_z_layer

_HEADS = {"gpt2-small": 12, "gpt2": 12, "gelu-2l": 8}  # TransformerLens names -> attention heads
_HUB_NAMES = {"gpt2-small": "gpt2"}
_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")


def cfg_path(pt: Path) -> Path:
    """The ``NAME_cfg.json`` beside ``NAME.pt``."""
    return pt.with_name(pt.stem + "_cfg.json")


def _state(pt: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SAEFileError(f"{pt} is not a readable tensor state dict ({why}); download it again") from None
    if not isinstance(state, dict):
        raise SAEFileError(f"{pt} holds a {type(state).__name__}, not a state dict of W_enc, b_enc, W_dec, b_dec")
    missing = [n for n in _WEIGHTS if n not in state]
    if missing:
        raise SAEFileError(f"{pt} lacks {missing}; Kissane et al.'s SAEs hold W_enc, b_enc, W_dec and b_dec")
    return {n: state[n] for n in _WEIGHTS}


def _hook_shape(cfg: dict, d_in: int, model: str) -> tuple[int, ...]:
    n_heads = cfg.get("n_heads") or (d_in // cfg["d_head"] if cfg.get("d_head") else _HEADS.get(model))
    if not n_heads or d_in % n_heads:
        return ()
    return (n_heads, d_in // n_heads)


def from_kissane(pt: Path) -> tuple[dict, dict]:
    """saekit's config dict and weights of Kissane et al.'s ``NAME.pt`` (with ``NAME_cfg.json``)."""
    cj = cfg_path(pt)
    if not cj.is_file():
        raise SAEFileError(f"{pt}: no {cj.name} beside it; Kissane et al.'s SAEs come as NAME.pt with NAME_cfg.json")
    cfg = read_json(cj)
    missing = [n for n in ("act_size", "dict_size", "act_name") if n not in cfg]
    if missing:
        raise SAEFileError(f"{cj} lacks {missing}; is it the cfg of Kissane et al.'s AutoEncoder?")
    d_in, d_sae, hook = int(cfg["act_size"]), int(cfg["dict_size"]), str(cfg["act_name"])
    if cfg.get("site") in ("q", "k", "v", "z") and not cfg.get("concat_heads", True):
        raise SAEFileError(f"{cj}: concat_heads is false: the SAE reads one head's {cfg['site']} (head "
                           f"{cfg.get('head')}), and saekit splices whole hooks")
    w = _state(pt)
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for n, shape in want.items():
        if tuple(w[n].shape) != shape:
            raise SAEFileError(f"{pt}: tensor {n} has shape {tuple(w[n].shape)}, {cj.name} implies {shape} "
                               f"(act_size={d_in}, dict_size={d_sae})")
    model = str(cfg.get("model_name", ""))
    out = {"d_in": d_in, "d_sae": d_sae, "k": min(32, d_sae), "sparsity": "standard", "hook_name": hook,
           "model_name": _HUB_NAMES.get(model, model),
           "hook_shape": _hook_shape(cfg, d_in, model) if hook_z_layer(hook) is not None else ()}
    return out, {n: t.float() for n, t in w.items()}
