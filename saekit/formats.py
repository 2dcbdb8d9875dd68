"""SAE files: saekit's own layout, and SAELens', EleutherAI sparsify's, Gemma Scope's and
Kissane et al.'s for interop (docs/formats.md).

- saekit: cfg.json (``"format": "saekit"``) + sae.safetensors; weights W_enc [d_in, d_sae],
  b_enc, W_dec [d_sae, d_in], b_dec and the sparsifier's buffers.
- SAELens: cfg.json + sae_weights.safetensors; the same names and shapes as saekit, the
  settings folded in (``saekit.saelens``).
- sparsify: cfg.json (d_in, k, num_latents / expansion_factor) + sae.safetensors; weights
  encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec.
- Gemma Scope: params.npz (``saekit.gemmascope``); Kissane et al.: NAME.pt + NAME_cfg.json
  (``saekit.kissane``); any of these on the Hub as ``hf://ORG/REPO/PATH`` (``saekit.hub``).

``SAE.save`` writes the first two (saekit/sae.py), ``load_sae`` here reads them all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saekit import hub, pretrained
from saekit.errors import SAEFileError
from saekit.files import CFG, SAEKIT_WEIGHTS, SAELENS_WEIGHTS, read_json, read_tensors
from saekit.gemmascope import PARAMS, from_gemma_scope
from saekit.kissane import from_kissane
from saekit.sae import SAE
from saekit.saelens import from_saelens
from saekit.types import SAEConfig


# ---- load ------------------------------------------------------------------------------------

def _from_sparsify(cfg: dict, w: dict, folder: Path) -> tuple[dict, dict]:
    try:
        W_enc = w["encoder.weight"].T  # sparsify: nn.Linear(d_in, d_sae) -> [d_sae, d_in]
        d_sae, d_in = w["encoder.weight"].shape
        W_dec = w["W_dec"]
        if W_dec.shape != (d_sae, d_in):
            W_dec = W_dec.T
        out = {"W_enc": W_enc, "b_enc": w["encoder.bias"], "W_dec": W_dec, "b_dec": w["b_dec"]}
    except KeyError as e:
        raise SAEFileError(f"{folder} looks like a sparsify SAE but has no {e} tensor") from None
    if not isinstance(cfg.get("k"), int) or cfg["k"] < 1:
        raise SAEFileError(f'{folder / "cfg.json"} of this sparsify SAE gives no k; add "k": <latents per token>')
    return {"d_in": d_in, "d_sae": d_sae, "k": cfg["k"], "hook_name": folder.name}, out


def _read(path: Path, hook_name: str | None, model_name: str | None) -> tuple[dict, dict]:
    """saekit's config dict and the state dict of the SAE at local ``path`` (layout from its files)."""
    if path.is_file():
        if path.suffix == ".pt":
            return from_kissane(path)
        if path.suffix == ".npz":
            return from_gemma_scope(path, hook_name, model_name)
        raise SAEFileError(f"{path} is not a file saekit reads as an SAE; pass a folder (cfg.json and weights), a "
                           "Gemma Scope params.npz or a Kissane et al. NAME.pt")
    if not path.is_dir():
        raise SAEFileError(f"no SAE folder at {path}; pass a folder holding cfg.json and the weights")
    if (path / PARAMS).is_file() and not (path / CFG).exists():
        return from_gemma_scope(path / PARAMS, hook_name, model_name)
    cfg = read_json(path / CFG)
    if (path / SAELENS_WEIGHTS).exists():
        return from_saelens(cfg, read_tensors(path / SAELENS_WEIGHTS), path)
    if not (path / SAEKIT_WEIGHTS).exists():
        raise SAEFileError(f"{path} has cfg.json but no {SAEKIT_WEIGHTS} or {SAELENS_WEIGHTS}")
    w = read_tensors(path / SAEKIT_WEIGHTS)
    if cfg.get("format") == "saekit":
        return {k: v for k, v in cfg.items() if k != "format"}, w
    if "encoder.weight" in w:
        return _from_sparsify(cfg, w, path)
    raise SAEFileError(f"{path / CFG} is neither saekit's nor sparsify's layout")


def load_sae(path, device: str | torch.device = "cpu", *, hook_name: str | None = None,
             model_name: str | None = None) -> SAE:
    """Load an SAE: a folder of saekit, SAELens or sparsify layout (detected from its files) or
    holding Gemma Scope's ``params.npz``, a ``params.npz`` itself, Kissane et al.'s ``NAME.pt``
    (with ``NAME_cfg.json``), or any of these on the Hugging Face Hub as
    ``hf://ORG/REPO[@REVISION]/PATH`` (``saekit.hub``). ``hook_name`` / ``model_name``, when
    given, replace what the files say (Gemma Scope's name neither; saekit.gemmascope)."""
    where = path
    local = hub.download(path) if hub.is_hub(path) else Path(path)
    cfg_dict, w = _read(local, hook_name, model_name)
    cfg_dict.update({k: v for k, v in (("hook_name", hook_name), ("model_name", model_name)) if v is not None})
    sae = SAE(SAEConfig.from_dict(cfg_dict))
    expected = sae.state_dict()
    for name, t in w.items():
        if name not in expected:
            raise SAEFileError(f"{where}: unexpected tensor {name!r} for a {sae.cfg.sparsity} SAE")
        if t.shape != expected[name].shape:
            raise SAEFileError(f"{where}: tensor {name} has shape {tuple(t.shape)}, "
                               f"cfg.json implies {tuple(expected[name].shape)}")
    missing = [n for n in expected if not n.startswith("sparsifier.") and n not in w]
    if missing:
        raise SAEFileError(f"{where}: weights file lacks {missing}")
    sae.load_state_dict(w, strict=False)
    return sae.to(device).eval()  # inference: batch-level sparsifiers use their thresholds


def results_folder(path) -> Path:
    """Where commands write results "beside" the SAE at ``path`` (eval.json, stats/, ...): the
    folder itself; for ``NAME.pt`` a folder ``NAME/`` beside it; for a ``params.npz`` its folder;
    for ``hf://`` paths ``runs/hf/ORG/REPO/PATH`` under the working directory (``saekit.hub``)."""
    if hub.is_hub(path):
        return hub.results_folder(path)
    p = Path(path)
    if p.suffix == ".pt":
        return p.with_suffix("")
    return p.parent if p.suffix == ".npz" else p


# ---- shipped SAEs ----------------------------------------------------------------------------

def shipped_saes() -> list[Path]:
    """The SAE folders shipped with saekit: ``pretrained/saes/*/`` holding a cfg.json, sorted."""
    root = Path(pretrained.__file__).parent / "saes"
    return sorted(p for p in root.iterdir() if (p / CFG).is_file()) if root.is_dir() else []
