"""Devices and dtypes: checks that a device is here and can compute in a dtype, and the
names the options use (``--dtype``, ``--sae-dtype``).

Nothing here runs at import time: the matmul probe runs at a dtype's first use on a device,
once per process.

Where saekit runs in what (docs/training-at-scale.md, "Precision"):
- the model in ``--dtype`` (``auto``: float32 on CPU, the model config's dtype on CUDA:
  ``saekit.models.model_dtype``); its activations are buffered and cached in that dtype;
- the SAE's step in ``--sae-dtype`` (``SAE.computing_in``), its parameters, Adam's moments,
  checkpoints and files always in float32.
"""

from __future__ import annotations

import typing

import torch

from saekit.errors import ConfigError, DeviceError
from saekit.types import ModelDtypeName

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (device, dtype) -> the probe's failure (its exception's name), or None where it ran
_PROBED: dict[tuple[str, torch.dtype], str | None] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name options and meta.json use."""
    return str(dtype).removeprefix("torch.")


def as_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """The torch dtype of a ``--dtype`` value (a name or a torch dtype); None for ``"auto"``.
    Raises ``ConfigError`` for anything but auto, float32, bfloat16 and float16."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype == "auto":
        return None
    raise ConfigError(f"dtype must be one of {', '.join(typing.get_args(ModelDtypeName))} (or their torch "
                      f"dtypes), not {dtype!r}")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or a ``DeviceError`` when it is no device name or
    (CUDA) not on this machine; reads ``torch.cuda``, never initialises a GPU context."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {device!r} is not a torch device; write cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"--device {device}: torch sees no CUDA GPU here (a CPU-only torch build, or no GPU "
                              "or driver); use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"--device {device}: torch sees {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    return dev


def check_dtype_runs(dtype: torch.dtype, device: str | torch.device, option: str = "--dtype") -> None:
    """Raise ``DeviceError`` unless a ``dtype`` matmul runs on ``device``: a 2×2 product,
    tried once per process and (device, dtype). Some torch builds lack half-precision
    kernels on CPU (``addmm_impl_cpu_ not implemented for 'Half'``); the probe turns what
    would be a traceback deep in the model's first forward into one line before loading it."""
    dev = torch.device(device)
    key = (str(dev), dtype)
    if key not in _PROBED:
        try:
            _PROBED[key] = None if _matmul_probe(dtype, dev) else "WrongResult"
        except (RuntimeError, NotImplementedError, TypeError) as e:
            _PROBED[key] = type(e).__name__
    if _PROBED[key] is not None:
        raise DeviceError(f"{option} {dtype_name(dtype)}: a {dtype_name(dtype)} matmul does not run on {dev} with "
                          f"this torch build ({_PROBED[key]}); use {option} float32")


def _matmul_probe(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a 2×2 ``dtype`` product of ones on ``device`` gives 2s (raises where the build
    has no such kernel)."""
    a = torch.ones(2, 2, dtype=dtype, device=device)
    return bool((a @ a == 2).all())
