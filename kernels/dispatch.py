"""Choosing between the plain-PyTorch reference and the Triton kernels.

`impl` is always explicit in the public API: "auto" | "torch" | "triton" | "screen". The decision is
logged once per process (per distinct decision) at INFO on the "saekit.kernels" logger,
never printed. Nothing here runs at import time: triton is looked up lazily, so
`import saekit.kernels` works where triton is not installed (macOS) and the torch path
still works there.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache

import torch

log = logging.getLogger("saekit.kernels")

IMPLS = ("auto", "torch", "triton", "screen")
# The fused TopK encoder keeps k keys a row in registers. AuxK's k_aux has no limit: it ranks
# a product over the dead columns (encoder.PreActivations.columns). "auto" runs the PyTorch encoder above it.
TRITON_MAX_K = 512
_logged: set[tuple[str, str, str]] = set()


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the `triton` package can be imported (looked up once, not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """Map a requested `impl` to the one that will run on `device`: "torch", "triton" or
    "screen".

    "auto" -> "triton" on CUDA when triton is importable (provisional: no GPU has measured it;
    the default on CUDA must follow the impl="auto" table of benchmarks/gpu_check.sh, torch
    wherever torch's training step is faster), else "torch" (the TopK encoder and
    Mutual/Feature Choice's selections then take "screen" on CPUs with AMX where it pays,
    see encoder.encoder_impl).
    "triton" on a CPU tensor is allowed only under TRITON_INTERPRET=1 (the test setting);
    otherwise a one-line ValueError says why.
    "screen" (CPU only) is the plain-PyTorch path whose selections rank through a bf16
    matmul and rescore the candidates in fp32 (kernels/screen.py, screen_batch.py); the
    other ops run as "torch".
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    dev = torch.device(device)
    if impl == "auto":
        resolved = "triton" if dev.type == "cuda" and triton_available() else "torch"
    elif impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' but the triton package is not installed; use impl='torch'")
        if dev.type != "cuda" and not interpreting():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got {dev.type}); set TRITON_INTERPRET=1 to run "
                "the kernels in Triton's CPU interpreter, or use impl='torch'"
            )
        resolved = "triton"
    elif impl == "screen":
        if dev.type != "cpu":
            raise ValueError(f"impl='screen' is a CPU path (got {dev.type} tensors); use impl='auto'")
        resolved = "screen"
    else:
        resolved = "torch"
    log_decision(impl, resolved, dev.type)
    return resolved


def log_decision(impl: str, resolved: str, where: str) -> None:
    """Log each distinct dispatch decision once per process."""
    key = (impl, resolved, where)
    if key not in _logged:
        _logged.add(key)
        log.info("impl=%r on %s -> %s", impl, where, resolved)
