"""Synthetic ground truth for judging SAE training itself (methods.md §9).

Data with known features: ``n_true`` unit vectors ``v_i`` in ``R^d`` (more features than
dimensions), each firing with a Zipf-distributed probability, with exponential magnitudes,
optionally in correlated groups, plus small Gaussian noise:

    x = Σ_i c_i·v_i + ε,   c_i = 0 unless feature i fires

An SAE trained on it is scored by MMCS (the mean over true features of the best cosine with
any decoder row) and the share of true features recovered at cosine ≥ 0.9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from saekit.errors import ConfigError
from saekit.metrics import fvu, l0_per_token
from saekit.training.config import DataOptions, OptimOptions, RunOptions, TrainConfig
from saekit.training.run import train_sae
from saekit.types import SAEConfig


@dataclass
class SyntheticOptions:
    """The ground-truth data."""

    d: int = 64
    """Dimension of the activations."""
    n_true: int = 512
    """Number of true features."""
    mean_active: float = 8.0
    """Expected number of features firing per sample."""
    zipf_exponent: float = 0.5
    """Firing probability of the feature of rank r is proportional to r^-exponent."""
    magnitude: float = 1.0
    """Mean of the exponential magnitudes (added to a floor of 0.5·magnitude)."""
    group_size: int = 1
    """Features per correlated group (1 = independent)."""
    group_coupling: float = 0.0
    """Chance that a group's other features fire with its first."""
    noise: float = 0.01
    """Standard deviation of the Gaussian noise per dimension."""
    seed: int = 0
    """Seed of the features and the samples."""

    def __post_init__(self):
        if self.n_true < 1 or self.d < 1 or self.mean_active <= 0 or self.group_size < 1:
            raise ConfigError("need d, n_true, group_size >= 1 and mean_active > 0")
        if not 0 <= self.group_coupling <= 1 or self.noise < 0:
            raise ConfigError("need 0 <= group_coupling <= 1 and noise >= 0")


class GroundTruth(NamedTuple):
    features: Tensor  # [n_true, d], unit rows
    probs: Tensor     # [n_true], firing probabilities


def ground_truth(o: SyntheticOptions) -> GroundTruth:
    g = torch.Generator().manual_seed(o.seed)
    v = torch.nn.functional.normalize(torch.randn(o.n_true, o.d, generator=g), dim=1)
    p = torch.arange(1, o.n_true + 1, dtype=torch.float).pow(-o.zipf_exponent)
    p = (p * o.mean_active / p.sum()).clamp(max=1.0)
    return GroundTruth(v, p)


def sample(o: SyntheticOptions, truth: GroundTruth, n: int, seed: int = 1) -> Tensor:
    """``n`` samples ``[n, d]``."""
    g = torch.Generator().manual_seed(o.seed * 1_000_003 + seed)
    fire = torch.rand(n, o.n_true, generator=g) < truth.probs
    if o.group_size > 1 and o.group_coupling > 0:
        leaders = torch.arange(0, o.n_true, o.group_size)
        for off in range(1, o.group_size):
            members = leaders + off
            members = members[members < o.n_true]
            pulled = fire[:, leaders[: len(members)]] & (torch.rand(n, len(members), generator=g) < o.group_coupling)
            fire[:, members] |= pulled
    mags = o.magnitude * (0.5 + torch.empty(n, o.n_true).exponential_(1.0, generator=g))
    x = (fire * mags) @ truth.features
    return x + o.noise * torch.randn(n, o.d, generator=g)


def mmcs(W_dec: Tensor, features: Tensor) -> tuple[float, float]:
    """(MMCS, share of true features with a decoder row at cosine ≥ 0.9)."""
    cos = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(W_dec, dim=1).T
    best = cos.max(dim=1).values  # [n_true]
    return best.mean().item(), (best >= 0.9).float().mean().item()


@torch.no_grad()
def score(sae, o: SyntheticOptions, truth: GroundTruth, n_eval: int = 16384) -> dict:
    """MMCS, recovered share, never-fired fraction and FVU of ``sae`` on fresh samples."""
    sae.eval()
    x = sample(o, truth, n_eval, seed=2)
    out = sae(x)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    fired[out.codes.indices[out.codes.values > 0]] = True
    m, rec = mmcs(sae.W_dec, truth.features)
    return {"mmcs": m, "recovered_0.9": rec, "never_fired_frac": 1 - fired.float().mean().item(),
            "fvu": fvu(x, out.x_hat), "l0": l0_per_token(out.codes.values).sum().item() / n_eval}


def bench(o: SyntheticOptions, variants=("topk", "mutual_choice", "feature_choice", "matryoshka", "standard",
                                          "gated", "jumprelu"), d_sae: int = 1024,
          k: int = 8, n_train: int = 262_144, steps: int = 2000, batch: int = 4096, lr: float = 2e-3) -> list[dict]:
    """Train each variant on the same data; one row of scores each. The TopK family trains at
    mean L0 ``k``; standard, gated and jumprelu at their default penalty weights, so their L0
    is what the penalty gives (the row shows it)."""
    truth = ground_truth(o)
    x = sample(o, truth, n_train)
    rows = []
    for v in variants:
        cfg = TrainConfig(sae=SAEConfig(d_sae=d_sae, k=k, sparsity=v),
                          data=DataOptions(batch_size=batch, fill_tokens=min(n_train, 65536),
                                           total_tokens=steps * batch),
                          optim=OptimOptions(lr=lr, warmup_steps=min(100, steps // 10), dead_tokens=batch * 50),
                          run=RunOptions(progress=False))
        sae = train_sae(x, cfg)
        rows.append({"variant": v, **score(sae, o, truth)})
    return rows


def format_table(rows: list[dict], o: SyntheticOptions) -> str:
    head = (f"synthetic: d={o.d}, {o.n_true} true features, mean {o.mean_active:g} active, "
            f"Zipf exponent {o.zipf_exponent:g}, noise {o.noise:g}\n"
            "| variant | MMCS | recovered (cos ≥ 0.9) | never fired | FVU | L0 |\n|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {r['variant']} | {r['mmcs']:.3f} | {r['recovered_0.9']:.3f} | {r['never_fired_frac']:.3f} "
        f"| {r['fvu']:.3f} | {r['l0']:.1f} |" for r in rows)
