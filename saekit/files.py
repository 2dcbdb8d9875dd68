"""Files, written safely: every write goes to a temporary name in the same folder and is
renamed into place, so a crash never leaves a half-written file; reads fail with a one-line
``SAEFileError`` naming the file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saekit.errors import SAEFileError

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


# The names of an SAE folder's files.
CFG = "cfg.json"
SAEKIT_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
