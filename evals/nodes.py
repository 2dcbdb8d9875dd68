"""IOI nodes: attention heads' (or whole layers') ``hook_z`` at one position, END or S2.

A node's activation for prompt ``i`` is ``hook_z[i, pos_i, head]`` (``[d_head]``) or, for a
whole-layer node, ``hook_z[i, pos_i]`` flattened to ``[n_heads·d_head]`` — the layout of
a saekit ``hook_z`` SAE's input, so an SAE at that layer reads a node by slicing.

GPT-2 small uses the heads of Wang et al.'s circuit, as Makelov et al. do; for any other
model the nodes are found by mean-ablating each head at END and at S2 and measuring the
fall of the logit difference (methods.md §7).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from saekit.activations import capture
from saekit.errors import ConfigError
from saekit.evals.ioi_data import IOIData
from saekit.hooks import hook_z_name
from saekit.ioi import logit_diff


@dataclass(frozen=True)
class Node:
    layer: int
    pos: Literal["end", "s2"]
    head: int | None = None  # None: the whole layer

    @property
    def name(self) -> str:
        head = "" if self.head is None else f"H{self.head}"
        return f"L{self.layer}{head}.{self.pos.upper()}"

    @property
    def hook(self) -> str:
        return hook_z_name(self.layer)

    def slice(self, d_head: int) -> slice:
        """Where the node sits in the flattened ``[n_heads·d_head]`` layer activation."""
        if self.head is None:
            return slice(None)
        return slice(self.head * d_head, (self.head + 1) * d_head)

    @classmethod
    def parse(cls, text: str, n_layers: int, n_heads: int) -> "Node":
        m = re.fullmatch(r"L(\d+)(?:H(\d+))?\.(END|S2)", text.strip(), re.IGNORECASE)
        if not m:
            raise ConfigError(f"unknown node {text!r}; write L<layer>.END, L<layer>H<head>.END "
                              "or ...S2, e.g. L5.END or L4H1.S2")
        layer, head = int(m[1]), None if m[2] is None else int(m[2])
        if layer >= n_layers or (head is not None and head >= n_heads):
            raise ConfigError(f"node {text!r} is outside this model ({n_layers} layers, {n_heads} heads)")
        return cls(layer, m[3].lower(), head)


# Wang et al. (2022), as used by Makelov et al.: name movers and S-inhibition heads at END,
# induction and duplicate-token heads at S2.
GPT2_SMALL_NODES = tuple(
    [Node(l, "end", h) for l, h in ((9, 9), (9, 6), (10, 0))]
    + [Node(l, "end", h) for l, h in ((7, 3), (7, 9), (8, 6), (8, 10))]
    + [Node(l, "s2", h) for l, h in ((5, 5), (6, 9))]
    + [Node(l, "s2", h) for l, h in ((0, 1), (3, 0))]
)


def model_dims(model) -> tuple[int, int, int]:
    """``(n_layers, n_heads, d_head)``."""
    c = model.cfg
    return c.n_layers, c.n_heads, c.d_head


def _capture(model, data: IOIData, hook: str, take, batch: int = 256) -> Tensor:
    """``take(act, rows)`` of the activation at ``hook`` for each batch of prompts (the
    forward pass stops at the hook)."""
    out = []
    for i in range(0, len(data), batch):
        act = capture(model, data.tokens[i: i + batch], [hook])[hook]
        out.append(take(act, slice(i, i + len(act))).float().cpu())
    return torch.cat(out)


def layer_acts(model, data: IOIData, layer: int, pos: str) -> Tensor:
    """``hook_z`` of ``layer`` at each prompt's ``pos``, flattened: ``[n, n_heads·d_head]``."""
    where = data.position(pos)
    return _capture(model, data, hook_z_name(layer),
                    lambda act, rows: act[torch.arange(len(act)), where[rows].to(act.device)].flatten(1))


def resid_pre(model, data: IOIData, layer: int) -> Tensor:
    """The clean residual stream entering ``layer``, ``[n, T, d_model]``: patched runs start
    there (``start_at_layer``) instead of recomputing the layers below the node."""
    return _capture(model, data, f"blocks.{layer}.hook_resid_pre", lambda act, rows: act)


class Readout(NamedTuple):
    ld: Tensor  # [n] logit(IO) − logit(S) at END
    pred: Tensor  # [n] argmax token at END


def logits_batch_size(model, data: IOIData) -> int:
    """Prompts per forward pass that keep the ``[b, T, vocab]`` logits near 256 MB."""
    return max(8, min(512, (1 << 26) // (data.tokens.shape[1] * model.cfg.d_vocab)))


@torch.no_grad()
def readout(model, data: IOIData, node: Node | None = None, values: Tensor | None = None,
            resid: Tensor | None = None) -> Readout:
    """Run the prompts, with ``node``'s activation replaced by ``values [n, d_node]`` if
    given, and read the logit difference and the prediction at END. With ``resid`` (from
    ``resid_pre`` at the node's layer) the run starts at that layer."""
    d_head = model.cfg.d_head
    lds, preds = [], []
    bs = logits_batch_size(model, data)
    for i in range(0, len(data), bs):
        x = (data.tokens if resid is None else resid)[i: i + bs].to(model.cfg.device)
        if resid is not None:  # held in float32 (_capture); the run continues in the model's dtype
            x = x.to(model.cfg.dtype)
        rows = torch.arange(len(x))
        hooks, start = [], None if resid is None else node.layer
        if node is not None:
            where = data.position(node.pos)[i: i + bs]
            new = values[i: i + bs]

            def patch(act, hook=None, where=where, new=new):
                flat = act.flatten(2).clone()  # [b, T, n_heads·d_head]
                flat[rows, where.to(act.device), node.slice(d_head)] = new.to(act.device, act.dtype)
                return flat.view_as(act)

            hooks = [(node.hook, patch)]
        logits = model.run_with_hooks(x, fwd_hooks=hooks, start_at_layer=start)[rows, data.end[i: i + bs]].float()
        lds.append(logit_diff(logits, data.io_tok[i: i + bs], data.s_tok[i: i + bs]).cpu())
        preds.append(logits.argmax(-1).cpu())
    return Readout(torch.cat(lds), torch.cat(preds))


def ablation_table(model, data: IOIData) -> list[dict]:
    """For each head at END and at S2, and each whole layer at END: the share of the clean
    logit difference lost when that activation is mean-ablated (its mean over the prompts)."""
    n_layers, n_heads, d_head = model_dims(model)
    clean = readout(model, data).ld.mean().item()
    rows = []
    for layer in range(n_layers):
        resid = resid_pre(model, data, layer)
        for pos in ("end", "s2"):
            acts = layer_acts(model, data, layer, pos)
            nodes = [Node(layer, pos, h) for h in range(n_heads)] + ([Node(layer, pos)] if pos == "end" else [])
            for node in nodes:
                a = acts[:, node.slice(d_head)]
                ld = readout(model, data, node, a.mean(0).expand_as(a), resid).ld.mean().item()
                rows.append({"node": node.name, "layer": layer, "head": node.head, "pos": pos,
                             "ld_clean": clean, "ld_ablated": ld, "effect": (clean - ld) / clean})
    return sorted(rows, key=lambda r: -r["effect"])


def ioi_nodes(table: list[dict], n_layers: int, top: int = 8, min_effect: float = 0.05) -> list[Node]:
    """The heads whose mean ablation costs at least ``min_effect`` of the logit difference
    (at most ``top`` of them), and every layer's whole ``hook_z`` at END."""
    heads = [r for r in table if r["head"] is not None and r["effect"] >= min_effect][:top]
    return [Node(r["layer"], r["pos"], r["head"]) for r in heads] + [Node(l, "end") for l in range(n_layers)]


def main_layer(table: list[dict]) -> int:
    """The layer whose whole ``hook_z`` at END carries the most IOI signal."""
    return max((r for r in table if r["head"] is None), key=lambda r: r["effect"])["layer"]
