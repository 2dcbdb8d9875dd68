"""Checks on the run folder before any training: it can be written, it has room for the
run's files, and it either is new or holds a run that ``--resume`` may continue.

A run that would die at its first checkpoint (unwritable folder, full disk) should die
before the model is loaded, with one line that says why.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from saekit.errors import ConfigError
from saekit.training import checkpoint as ckpt

MiB = 2**20


def check_writable(out: Path) -> None:
    """Create ``out`` and write and delete a small probe file in it (named per process: with
    ``--distribute-hooks`` every rank probes the same folder at once)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise ConfigError(f"cannot write to --out {out} ({why}); pick a writable folder") from None


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def bytes_needed(n_params: list[int]) -> int:
    """Disk a run needs: per SAE, ``KEEP + 1`` checkpoints alive at once (a new one is written
    before the oldest is deleted), each the parameters plus Adam's two moments in float32,
    plus the final SAE file; and a MiB of logs per SAE."""
    per_param = 4 * (3 * (ckpt.KEEP + 1) + 1)
    return sum(n * per_param + MiB for n in n_params)


def check_space(out: Path, n_params: list[int]) -> None:
    need, free = bytes_needed(n_params), free_bytes(out)
    if free < need:
        raise ConfigError(f"not enough disk space in --out {out}: {free / MiB:.0f} MiB free, the run needs "
                          f"about {need / MiB:.0f} MiB for checkpoints and the SAE; free space or pick another folder")


def find_resume_state(out: Path, resume: bool, cfg) -> dict | None:
    """The newest intact checkpoint in ``out`` (with a warning for each corrupt one skipped),
    or ``None`` for a new run; refuses to overwrite a run without ``--resume`` and to
    resume one with a different config."""
    state = ckpt.latest(out) if (out / "checkpoints").exists() else None
    if state and not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if state:
        ckpt.check_same_config(state["config"], cfg)
    return state
