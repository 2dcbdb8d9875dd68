"""TransformerLens hook names that saekit reads structure from.

An attention layer's ``hook_z`` (``[batch, pos, n_heads, d_head]``) is
``blocks.{layer}.attn.hook_z``; every name test and every such name saekit builds goes
through ``hook_z_layer`` and ``hook_z_name``.
"""

from __future__ import annotations

import re

_HOOK_Z = re.compile(r"blocks\.(\d+)\.attn\.hook_z")


def hook_z_layer(name: str) -> int | None:
    """The layer ``L`` if ``name`` is exactly ``blocks.L.attn.hook_z``, else ``None``."""
    m = _HOOK_Z.fullmatch(name)
    return None if m is None else int(m[1])


def hook_z_name(layer: int) -> str:
    """``blocks.{layer}.attn.hook_z``: the attention output per head of ``layer``."""
    return f"blocks.{layer}.attn.hook_z"
