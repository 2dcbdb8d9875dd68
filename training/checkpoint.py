"""Checkpoints: the trainer's whole state, written atomically with a SHA-256 beside it.

``out/checkpoints/step_0000200.pt`` + ``step_0000200.sha256``. Resuming takes the newest
checkpoint whose checksum matches and falls back to the one before with a warning; the
last ``KEEP`` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from pathlib import Path

import torch

from saekit.errors import ConfigError, SAEFileError, SaekitError
from saekit.files import atomic_write_bytes, atomic_write_text

KEEP = 2
log = logging.getLogger("saekit.training")


class CheckpointWriteError(SaekitError):
    """A checkpoint could not be written (full disk, vanished folder); the previous one is kept."""


def _dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def save(out: Path, state: dict, cfg) -> Path:
    buf = io.BytesIO()
    torch.save({"state": state, "config": cfg.identity()}, buf)
    data = buf.getvalue()
    path = _dir(out) / f"step_{state['step']:07d}.pt"
    try:  # the checksum is written last: a checkpoint without one is never trusted
        atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(data))
        atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest())
    except OSError as e:
        raise CheckpointWriteError(f"could not write checkpoint {path} ({e.strerror or e}); free space "
                                   "or fix --out, then --resume (the previous checkpoint is kept)") from None
    for old in sorted(_dir(out).glob("step_*.pt"))[:-KEEP]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def _read(path: Path) -> dict:
    data = path.read_bytes()
    sha = path.with_suffix(".sha256")
    if not sha.exists() or sha.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise SAEFileError(f"checkpoint {path} fails its checksum")
    return torch.load(io.BytesIO(data), weights_only=False)


def latest(out: Path) -> dict | None:
    """The newest intact checkpoint in ``out`` (``None`` if there is none at all)."""
    paths = sorted(_dir(out).glob("step_*.pt"), reverse=True)
    for path in paths:
        try:
            return _read(path)
        except Exception as e:  # a torn or corrupt file: fall back to the one before
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=2)
    if paths:
        raise SAEFileError(f"every checkpoint in {_dir(out)} is corrupt; start again without --resume")
    return None


def _leaves(d: dict, prefix: str = "") -> dict:
    """``{"sae.variant.beta": 1.0, ...}``: a nested dict's values by dotted name."""
    out = {}
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def check_same_config(saved: dict, cfg) -> None:
    """Refuse ``--resume`` when the checkpoint's config identity (``saved``, of any saekit
    layout) differs from ``cfg``'s."""
    now = _leaves(cfg.identity())
    then = _leaves(type(cfg).from_dict(saved).identity())
    diffs = [k for k in now if then.get(k) != now[k]]
    if diffs:
        raise ConfigError(f"--resume with a different config ({', '.join(diffs[:4])} changed); "
                          "use the original options or a new --out")
