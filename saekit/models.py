"""Load a model as a TransformerLens ``TransformerBridge``.

``load_model()`` returns saekit's embedded model (``pretrained/``); a local folder in
Hugging Face format or a hub name (``"gpt2"``) goes through the same
``TransformerBridge.boot_transformers`` path, in the dtype ``model_dtype`` picks.
"""

from __future__ import annotations

import logging
import os
import socket
import weakref
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub import constants, try_to_load_from_cache
from transformer_lens.model_bridge import TransformerBridge

from saekit import placement, pretrained
from saekit.errors import ModelLoadError
from saekit.precision import DTYPES, as_dtype, check_device, check_dtype_runs

EMBEDDED_NAME = "saekit-ioi-6l"
log = logging.getLogger("saekit.models")

# model -> the name load_model was given: saekit's own record, not an attribute set on
# TransformerLens' object (the bridge's cfg.model_name is the resolved folder or hub id).
_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_name(model, default: str | None = None) -> str | None:
    """The name ``model`` was loaded by (``load_model``'s ``name``, ``EMBEDDED_NAME`` for the
    embedded model): what cfg.json records as ``model_name``. ``default`` for a model that
    ``load_model`` did not make."""
    return _NAMES.get(model, default)


def embedded_model_path() -> Path:
    """Folder of the embedded model, found beside the installed package."""
    return Path(pretrained.__file__).parent / EMBEDDED_NAME


def _quiet_transformers() -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_model_name(name: str | None) -> str:
    """The string ``boot_transformers`` gets: a folder path or a hub name."""
    if name in (None, "", EMBEDDED_NAME):
        path = embedded_model_path()
        if not (path / "config.json").exists():
            raise ModelLoadError(f"the embedded model is missing at {path}; rebuild it with "
                                 "`python -m saekit.training.build_model`")
        return str(path)
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise ModelLoadError(f"{name} has no config.json: not a Hugging Face model folder")
        return str(Path(name).resolve())
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelLoadError(f"no such model folder: {name}")
    return name


def _hub_reachable(timeout: float = 3.0) -> bool:
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(name: str) -> bool:
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def native_dtype(target: str) -> torch.dtype:
    """The dtype the model's Hugging Face config declares (``dtype``; ``torch_dtype`` in
    transformers before 5), where it is one saekit runs (float32, bfloat16, float16); else
    float32. ``target``: a folder or hub name, as ``resolve_model_name`` gives it."""
    config = transformers.AutoConfig.from_pretrained(target)
    declared = getattr(config, "dtype", None) or config.to_dict().get("torch_dtype")
    if isinstance(declared, str):
        declared = DTYPES.get(declared.removeprefix("torch."))
    return declared if declared in DTYPES.values() else torch.float32


def model_dtype(dtype: str | torch.dtype, device: str | torch.device, target: str) -> torch.dtype:
    """The dtype a model runs in: ``dtype`` itself, or for ``"auto"`` float32 on CPU and the
    config's own (``native_dtype``) on CUDA. On CPU float32 is measured fastest: on a CPU
    without bf16/fp16 matmul units (AVX2) the half-precision forward is several times slower
    (benchmarks/RESULTS.md, "Precision"); a GPU runs a model fastest in the dtype it was made in."""
    chosen = as_dtype(dtype)
    if chosen is not None:
        return chosen
    return native_dtype(target) if torch.device(device).type == "cuda" else torch.float32


def load_model(name: str | None = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "auto", *, device_map: str | dict | None = None, n_devices: int = 1):
    """A ``TransformerBridge`` for ``name``: ``None`` is the embedded model, else a local
    folder or a hub name, on ``device`` in ``dtype`` (float32, bfloat16, float16 or their
    names; ``"auto"``: ``model_dtype``). Raises ``ModelLoadError`` with a one-line reason on
    failure, ``DeviceError`` for a device that is not here or cannot compute in the dtype, and
    ``ConfigError`` for another dtype.

    ``device_map`` (a strategy such as ``"auto"``, a ``{module: device}`` dict, or their
    ``--device-map`` text) or ``n_devices`` > 1 (CUDA GPUs) spread the model over several
    devices instead of ``device`` (``saekit.placement``); a dict that leaves a layer out
    raises ``DeviceMapError`` before anything is loaded."""
    check_device(device)
    as_dtype(dtype)  # refuse a bad dtype before anything slow
    device_map = placement.parse_device_map(device_map)
    placement.check_placement(device_map, n_devices)
    target = resolve_model_name(name)
    if not Path(target).is_dir() and not _in_hub_cache(target) and not _hub_reachable():
        # Fail in seconds, not after the hub client's minute of retries.
        raise ModelLoadError(f"could not load model {name!r}: it is not a local folder and the hub "
                             f"cannot be reached (no network); omit --model to use the embedded "
                             f"default {EMBEDDED_NAME!r}")
    _quiet_transformers()
    spread = device_map is not None or n_devices > 1
    if isinstance(device_map, dict):
        placement.check_covers(device_map, *placement.model_entries(target))
    try:
        dtype = model_dtype(dtype, device, target)
        check_dtype_runs(dtype, device)
        if spread:
            model = TransformerBridge.boot_transformers(target, device=None, dtype=dtype, device_map=device_map,
                                                        n_devices=n_devices if n_devices > 1 else None)
        else:
            model = TransformerBridge.boot_transformers(target, device=device, dtype=dtype)
    except (ValueError, RuntimeError) as e:
        if not spread:
            raise
        # transformer-lens and accelerate refuse maps they cannot run (a GPU mixed with cpu/disk,
        # CUDA absent for --n-devices, an unknown device name): their first sentence, on one line
        why = str(e).strip().splitlines()[0].split(". ")[0].rstrip(".")
        raise ModelLoadError(f"could not spread model {name or EMBEDDED_NAME!r} over devices: {why}") from None
    except OSError as e:  # transformers raises OSError for unknown repos and for no network
        offline = "offline" in str(e).lower() or "connect" in str(e).lower() or os.environ.get("HF_HUB_OFFLINE")
        why = "the hub cannot be reached (no network)" if offline else "no such model on the hub"
        raise ModelLoadError(f"could not load model {name!r}: {why}; omit --model to use the "
                             f"embedded default {EMBEDDED_NAME!r}") from None
    model.eval()
    _NAMES[model] = name or EMBEDDED_NAME  # what cfg.json records as the model name
    return model
