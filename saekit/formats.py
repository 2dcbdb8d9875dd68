"""SAE files: saekit's own layout, and SAELens' and EleutherAI sparsify's for interop.

- saekit: cfg.json (``"format": "saekit"``) + sae.safetensors; weights W_enc [d_in, d_sae],
  b_enc, W_dec [d_sae, d_in], b_dec and the sparsifier's buffers.
- SAELens: cfg.json + sae_weights.safetensors; the same names and shapes as saekit, the
  settings folded in (``saekit.saelens``).
- sparsify: cfg.json (d_in, k, num_latents / expansion_factor) + sae.safetensors; weights
  encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec.

``SAE.save`` writes the first two (saekit/sae.py), ``load_sae`` here reads all three.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saekit import pretrained
from saekit.errors import SAEFileError
from saekit.files import CFG, SAEKIT_WEIGHTS, SAELENS_WEIGHTS, read_json, read_tensors
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
    return {"d_in": d_in, "d_sae": d_sae, "k": int(cfg["k"]), "hook_name": folder.name}, out


def load_sae(path, device: str | torch.device = "cpu"):
    """Load an SAE folder of saekit, SAELens or sparsify layout (detected from its files)."""
    folder = Path(path)
    if not folder.is_dir():
        raise SAEFileError(f"no SAE folder at {folder}; pass a folder holding cfg.json and the weights")
    cfg = read_json(folder / CFG)
    if (folder / SAELENS_WEIGHTS).exists():
        cfg_dict, w = from_saelens(cfg, read_tensors(folder / SAELENS_WEIGHTS), folder)
    elif (folder / SAEKIT_WEIGHTS).exists():
        w = read_tensors(folder / SAEKIT_WEIGHTS)
        if cfg.get("format") == "saekit":
            cfg_dict = {k: v for k, v in cfg.items() if k != "format"}
        elif "encoder.weight" in w:
            cfg_dict, w = _from_sparsify(cfg, w, folder)
        else:
            raise SAEFileError(f"{folder / CFG} is neither saekit's nor sparsify's layout")
    else:
        raise SAEFileError(f"{folder} has cfg.json but no {SAEKIT_WEIGHTS} or {SAELENS_WEIGHTS}")
    sae = SAE(SAEConfig.from_dict(cfg_dict))
    expected = sae.state_dict()
    for name, t in w.items():
        if name not in expected:
            raise SAEFileError(f"{folder}: unexpected tensor {name!r} for a {sae.cfg.sparsity} SAE")
        if t.shape != expected[name].shape:
            raise SAEFileError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, "
                               f"cfg.json implies {tuple(expected[name].shape)}")
    missing = [n for n in expected if not n.startswith("sparsifier.") and n not in w]
    if missing:
        raise SAEFileError(f"{folder}: weights file lacks {missing}")
    sae.load_state_dict(w, strict=False)
    return sae.to(device).eval()  # inference: batch-level sparsifiers use their thresholds


# ---- shipped SAEs ----------------------------------------------------------------------------

def shipped_saes() -> list[Path]:
    """The SAE folders shipped with saekit: ``pretrained/saes/*/`` holding a cfg.json, sorted."""
    root = Path(pretrained.__file__).parent / "saes"
    return sorted(p for p in root.iterdir() if (p / CFG).is_file()) if root.is_dir() else []
