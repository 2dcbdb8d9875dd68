"""Settings of the SAE variants, shared by ``SAEConfig`` (saved in cfg.json) and the
``saekit train`` options. Imports nothing heavy, so the CLI can build its parser fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saekit.errors import ConfigError


@dataclass
class VariantOptions:
    """Settings of the gtopk, mutual_choice and feature_choice sparsifiers."""

    beta: float = 1.0
    """gtopk: weight of the gradient term in the selection score."""
    grad_norm: Literal["rms", "none"] = "rms"
    """gtopk: divide |g @ W_dec^T| by its RMS over latents per token (rms) or not (none)."""
    mc_mode: Literal["threshold", "batch"] = "threshold"
    """mutual_choice inference: the saved threshold, or the batch rule."""
    capacity: Literal["uniform", "zipf"] = "uniform"
    """feature_choice: latent capacities m_j, uniform or Zipf by firing-frequency rank."""
    zipf_s: float = 1.0
    """feature_choice with zipf capacity: the exponent s in m_j ∝ rank^-s."""
    rerank_every: int = 100
    """feature_choice with zipf capacity: steps between re-rankings by frequency."""
    threshold_decay: float = 0.9
    """mutual/feature_choice: decay of the moving averages behind the inference thresholds."""

    def __post_init__(self):
        if self.beta < 0 or not 0 <= self.threshold_decay < 1 or self.rerank_every < 1:
            raise ConfigError("need beta >= 0, 0 <= threshold_decay < 1, rerank_every >= 1")
