"""Load a model as a TransformerLens ``TransformerBridge``.

``load_model()`` returns saekit's embedded model (``pretrained/``); a local folder in
Hugging Face format or a hub name (``"gpt2"``) goes through the same
``TransformerBridge.boot_transformers`` path.
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


def load_model(name: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, *, device_map: str | dict | None = None, n_devices: int = 1):
    """A ``TransformerBridge`` for ``name``: ``None`` is the embedded model, else a local
    folder or a hub name. Raises ``ModelLoadError`` with a one-line reason on failure.

    ``device_map`` (a strategy such as ``"auto"``, a ``{module: device}`` dict, or their
    ``--device-map`` text) or ``n_devices`` > 1 (CUDA GPUs) spread the model over several
    devices instead of ``device`` (``saekit.placement``); a dict that leaves a layer out
    raises ``DeviceMapError`` before anything is loaded."""
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
