"""SAE files: saekit's own layout, and SAELens' and EleutherAI sparsify's for interop.

- saekit: cfg.json (``"format": "saekit"``) + sae.safetensors; weights W_enc [d_in, d_sae],
  b_enc, W_dec [d_sae, d_in], b_dec and the sparsifier's buffers.
- SAELens: cfg.json + sae_weights.safetensors; the same names and shapes as saekit, the
  settings folded in (``saekit.saelens``).
- sparsify: cfg.json (d_in, k, num_latents / expansion_factor) + sae.safetensors; weights
  encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec.

Every write goes to a temporary name in the same folder and is renamed into place, so a
crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saekit.errors import SAEFileError
from saekit.saelens import from_saelens, to_saelens

CFG = "cfg.json"
SAEKIT_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"


# ---- atomic writes ---------------------------------------------------------------------------

def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise SAEFileError(f"missing file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFileError(f"{path} is corrupt or not a safetensors file ({e}); re-save or retrain it") from None


def read_json(path: Path) -> dict:
    if not Path(path).is_file():
        raise SAEFileError(f"missing file {path}")
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFileError(f"{path} is not valid JSON ({e}); re-save it") from None


# ---- save ------------------------------------------------------------------------------------

def save_sae(sae, path, format: str = "saekit") -> None:
    """Write ``sae`` into folder ``path`` in ``format`` ("saekit" or "saelens")."""
    path = Path(path)
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    cfg = sae.cfg.to_dict()
    if format == "saekit":
        atomic_save_tensors(path / SAEKIT_WEIGHTS, {**weights, **sae.extra_state()})
        atomic_write_text(path / CFG, json.dumps({"format": "saekit", **cfg}, indent=1))
    elif format == "saelens":
        if sae.cfg.sparsity != "topk":
            raise SAEFileError(f"SAELens has no {sae.cfg.sparsity!r} architecture; save with format='saekit'")
        atomic_save_tensors(path / SAELENS_WEIGHTS, weights)
        lens_cfg = to_saelens(cfg)
        atomic_write_text(path / CFG, json.dumps(lens_cfg, indent=1))
    else:
        raise SAEFileError(f"unknown format {format!r}; use 'saekit' or 'saelens'")


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
    from saekit.sae import SAE, SAEConfig

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
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in w]
    if missing:
        raise SAEFileError(f"{folder}: weights file lacks {missing}")
    sae.load_state_dict(w, strict=False)
    return sae.to(device).eval()  # inference: batch-level sparsifiers use their thresholds


# ---- shipped SAEs ----------------------------------------------------------------------------

def shipped_saes() -> list[Path]:
    """The SAE folders shipped with saekit: ``pretrained/saes/*/`` holding a cfg.json, sorted."""
    from saekit import pretrained

    root = Path(pretrained.__file__).parent / "saes"
    return sorted(p for p in root.iterdir() if (p / CFG).is_file()) if root.is_dir() else []
