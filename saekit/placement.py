"""Where a model's modules go when it does not fit one device: ``--device-map`` and
``--n-devices``, passed to ``TransformerBridge.boot_transformers`` (transformer-lens 4),
which hands them to Hugging Face's ``from_pretrained`` and accelerate's dispatcher.

- ``--n-devices N`` (N > 1): split the model over the first N CUDA GPUs, layers balanced by
  accelerate (transformer-lens turns it into ``device_map="balanced"`` with a memory budget
  per GPU). CUDA only.
- ``--device-map``: one of accelerate's strategies (``auto``, ``balanced``,
  ``balanced_low_0``, ``sequential``), or an explicit map from module names to devices, as a
  JSON object or the path of a ``.json`` file holding one::

      {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": 0, ..., "transformer.h.6": 1,
       ..., "transformer.ln_f": 1, "lm_head": 0}

  A name covers every module below it (``"transformer": 0`` places all of GPT-2's body).
  Devices are GPU indices (``0``), ``"cuda:1"``, ``"cpu"`` or ``"disk"`` (accelerate keeps
  those weights off the GPU and loads them layer by layer); transformer-lens refuses a map
  that mixes ``cpu``/``disk`` with GPUs. Tied weights (GPT-2's ``wte`` and ``lm_head``) must
  sit on one device.

An explicit map must place every parameter of the model: ``check_covers`` says which layers
(and other modules) it leaves out before anything is loaded, as a ``DeviceMapError``.
The SAE itself lives on ``--device``; activations move to it from whichever GPU their
layer runs on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from saekit.errors import ConfigError, DeviceMapError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str | dict | None) -> str | dict | None:
    """``--device-map``'s value as ``from_pretrained`` takes it: ``None`` for ``""``/``None``,
    a strategy name, or a ``{module: device}`` dict (from a dict, a JSON object or a .json
    file). Raises ``ConfigError`` for anything else."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, dict):
        mapping, where = spec, "the device map"
    elif spec in STRATEGIES:
        return spec
    elif spec.lstrip().startswith("{"):
        mapping, where = _json(spec, "--device-map"), "--device-map"
    elif spec.endswith(".json"):
        if not Path(spec).is_file():
            raise ConfigError(f"--device-map file {spec} does not exist")
        mapping, where = _json(Path(spec).read_text(), spec), spec
    else:
        raise ConfigError(f"--device-map must be one of {', '.join(STRATEGIES)}, a JSON object "
                          f"{{\"module\": device, ...}} or a .json file holding one, not {spec!r}")
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"{where} must be a non-empty JSON object mapping module names to devices")
    for name, device in mapping.items():
        if isinstance(device, bool) or not isinstance(device, (int, str)):
            raise ConfigError(f"{where}: the device of {name!r} must be a GPU index or a device name "
                              f"such as \"cuda:1\", \"cpu\" or \"disk\", not {device!r}")
    return dict(mapping)


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON ({e})") from None


def check_placement(device_map: str | dict | None, n_devices: int) -> None:
    """Refuse ``--n-devices`` below 1 and both options at once."""
    if n_devices < 1:
        raise ConfigError(f"--n-devices must be at least 1, not {n_devices}")
    if device_map and n_devices > 1:
        raise ConfigError("pass --device-map or --n-devices, not both (--n-devices N is --device-map "
                          "balanced over N GPUs)")


def covered(name: str, device_map: dict) -> bool:
    """True when a key of ``device_map`` is ``name`` or a module above it (or ``""``: all)."""
    return any(k == "" or name == k or name.startswith(k + ".") for k in device_map)


def model_entries(target: str) -> tuple[list[str], int | None]:
    """Every state-dict entry (parameters and persistent buffers) of the model at ``target``
    (a folder or hub name), and its number of layers, from its config alone: the model is
    built on the meta device, which allocates nothing. The entries are the names accelerate
    requires a device map to place."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(target)
    try:  # the class transformer-lens itself loads for this architecture
        from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config
        from transformer_lens.model_bridge.sources.transformers.helpers import (
            get_hf_model_class_for_architecture)

        cls = get_hf_model_class_for_architecture(determine_architecture_from_hf_config(config))
    except (ImportError, ValueError, KeyError):  # transformer-lens moved them: causal LMs are the common case
        cls = AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    return list(model.state_dict()), getattr(config, "num_hidden_layers", None)


def _ranges(ints: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2, 5"``."""
    out, start = [], None
    for i, n in enumerate(ints):
        start = n if start is None else start
        if i + 1 == len(ints) or ints[i + 1] != n + 1:
            out.append(str(n) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def check_covers(device_map: dict, names: list[str], n_layers: int | None = None) -> None:
    """Raise ``DeviceMapError`` unless ``device_map`` places every entry of ``names``
    (``model_entries``) of a model of ``n_layers`` layers; the message names the layers left
    out, then any other modules."""
    missing = [n for n in names if not covered(n, device_map)]
    if not missing:
        return
    layers: dict[int, str] = {}
    others: list[str] = []
    for n in missing:
        m = re.match(r"^(.*?\.)(\d+)\.", n)  # the first numbered module list holds the layers
        if m:
            layers.setdefault(int(m.group(2)), m.group(1) + m.group(2))
        else:
            module = n.rsplit(".", 1)[0] if "." in n else n
            if module not in others:
                others.append(module)
    total = f" of the model's {n_layers}" if n_layers else ""
    parts = []
    if layers:
        idx = sorted(layers)
        which = layers[idx[0]] if len(idx) == 1 else f"{layers[idx[0]]} ... {layers[idx[-1]]}"
        parts.append(f"layer{'s' if len(idx) > 1 else ''} {_ranges(idx)}{total} ({which})")
    if others:
        parts.append(", ".join(others))
    raise DeviceMapError(f"the device map places no device on {' and on '.join(parts)}; map every layer, "
                         "the embeddings, the final norm and the unembedding, or use --device-map auto")
