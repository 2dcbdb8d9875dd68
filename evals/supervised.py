"""Supervised dictionaries (Makelov, Lange & Nanda 2024; methods.md §7).

At a node, each attribute value ``v`` of attribute ``attr`` gets a vector ``u_{attr,v}`` and
an activation is approximated as ``â = u_0 + Σ_attr u_{attr, v_attr(p)}``.
- *mean*: ``u_0 = mean(a)``, ``u_{attr,v} = mean(a | attr = v) − u_0``;
- *lstsq*: the least-squares fit of ``a`` on a one-hot design (an intercept plus one
  column per attribute value); the minimum-norm solution, since the one-hot blocks each sum
  to the intercept column. Reconstructions and edits do not depend on that choice.
A supervised edit of ``attr`` from ``v`` to ``v'`` is ``a − u_{attr,v} + u_{attr,v'}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import Tensor

from saekit.errors import SAEFileError
from saekit.files import atomic_save_tensors, read_tensors

Method = Literal["mean", "lstsq"]


class SupervisedDictionary:
    def __init__(self, u0: Tensor, U: dict[str, Tensor], values: dict[str, list[str]], method: Method,
                 node: str = ""):
        self.u0 = u0  # [d]
        self.U = U  # attr -> [n_values, d]
        self.values = values
        self.method = method
        self.node = node

    @classmethod
    def fit(cls, acts: Tensor, labels: dict[str, Tensor], values: dict[str, list[str]],
            method: Method = "mean", node: str = "") -> "SupervisedDictionary":
        """Fit on ``acts [n, d]`` with ``labels[attr] [n]`` (indices into ``values[attr]``).
        A value that never occurs gets a zero vector."""
        acts = acts.double()
        if method == "mean":
            u0 = acts.mean(0)
            U = {}
            for attr, lab in labels.items():
                one = torch.nn.functional.one_hot(lab, len(values[attr])).double()  # [n, V]
                count = one.sum(0)
                sums = one.T @ acts  # [V, d]
                U[attr] = torch.where(count[:, None] > 0, sums / count.clamp_min(1)[:, None] - u0, 0.0)
        elif method == "lstsq":
            blocks = [torch.ones(len(acts), 1, dtype=torch.double)]
            blocks += [torch.nn.functional.one_hot(labels[a], len(values[a])).double() for a in labels]
            X = torch.cat(blocks, 1)  # [n, 1 + Σ V]
            coef = torch.linalg.pinv(X) @ acts  # minimum-norm least squares, [1 + Σ V, d]
            u0, U, at = coef[0], {}, 1
            for attr in labels:
                V = len(values[attr])
                U[attr] = coef[at: at + V]
                at += V
        else:
            raise ValueError(f"method must be 'mean' or 'lstsq', not {method!r}")
        return cls(u0.float(), {a: u.float() for a, u in U.items()}, values, method, node)

    def features(self, labels: dict[str, Tensor]) -> Tensor:
        """``Σ_attr u_{attr, v_attr}`` per prompt: ``â − u_0``, ``[n, d]``."""
        return sum(self.U[a][labels[a]] for a in self.U)

    def reconstruct(self, labels: dict[str, Tensor]) -> Tensor:
        return self.u0 + self.features(labels)

    def edit(self, acts: Tensor, attr: str, old: Tensor, new: Tensor) -> Tensor:
        """Move ``acts [n, d]`` from value ``old`` to ``new`` of ``attr`` (indices ``[n]``)."""
        return acts - self.U[attr][old] + self.U[attr][new]

    def norms(self, attr: str) -> Tensor:
        """``‖u_{attr,v}‖`` per value, ``[n_values]``."""
        return self.U[attr].norm(dim=1)

    # ---- files ----------------------------------------------------------------------------
    def save(self, path) -> None:
        """One safetensors file; the values and method go in its metadata."""
        tensors = {"u0": self.u0.contiguous(), **{f"U.{a}": u.contiguous() for a, u in self.U.items()}}
        meta = {"values": json.dumps(self.values), "method": self.method, "node": self.node}
        atomic_save_tensors(Path(path), tensors, meta)

    @classmethod
    def load(cls, path) -> "SupervisedDictionary":
        path = Path(path)
        tensors = read_tensors(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "u0" not in tensors or "values" not in meta:
            raise SAEFileError(f"{path} is not a saekit supervised dictionary (no u0/values); "
                               "write one with `saekit eval-ioi --save-dictionaries`")
        U = {k[2:]: v for k, v in tensors.items() if k.startswith("U.")}
        return cls(tensors["u0"], U, json.loads(meta["values"]), meta.get("method", "mean"), meta.get("node", ""))
