"""saekit: train and study sparse autoencoders on transformer activations.

The public names load lazily, so ``import saekit`` does not import torch or
transformer-lens until they are used.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "SAE": "saekit.sae",
    "SAEConfig": "saekit.sae",
    "load_sae": "saekit.formats",
    "load_model": "saekit.models",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saekit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
