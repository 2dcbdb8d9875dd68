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
# The fused TopK encoder keeps k keys a row in registers; impl="triton" refuses a wider k. AuxK's
# k_aux has no limit: it ranks a product over the dead columns (encoder.PreActivations.columns).
TRITON_MAX_K = 512
# "auto" runs the Triton kernels on CUDA for bf16 at k up to this (resolve_impl). Measured on an
# H200: Triton's bf16 step wins at k 32 and loses at k 128; linear in k between, the step times
# cross near k 90 at each of the four shapes, and 64 stays below that.
AUTO_TRITON_MAX_K = 64
_logged: set[tuple[str, str, str]] = set()


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the `triton` package can be imported (looked up once, not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device | str, dtype: torch.dtype | None = None,
                 k: int | None = None) -> str:
    """Map a requested `impl` to the one that will run on `device`: "torch", "triton" or
    "screen".

    "auto" -> "triton" on CUDA (triton importable) for bf16 operands (``dtype``) with ``k``
    <= AUTO_TRITON_MAX_K latents a row, else "torch" (the TopK encoder and Mutual/Feature
    Choice's selections then take "screen" on CPUs with AMX where it pays, see
    encoder.encoder_impl). This follows the impl="auto" table of benchmarks/gpu_check.sh,
    measured on an H200 (benchmarks/RESULTS.md, "GPU check"): torch's fp32 training step
    beat Triton's at all 8 fp32 shapes (Triton 1.1-1.5x slower) and its fp32 AuxK steps by
    1.8-4.2x; in bf16 Triton's step was 2.0-2.3x faster at k 32 and 1.2-1.4x slower at k 128.
    The fused encoder never builds [B, d_sae] (7-8x less peak memory in the encoder, 1.3-5x
    less in the step): ask for it with impl="triton" where memory, not time, is short.
    Callers that know the operands' dtype and k pass them; without them "auto" is "torch".
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
        fused_pays = dtype == torch.bfloat16 and k is not None and k <= AUTO_TRITON_MAX_K
        resolved = "triton" if dev.type == "cuda" and fused_pays and triton_available() else "torch"
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
