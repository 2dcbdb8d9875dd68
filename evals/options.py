"""Options of ``saekit eval`` and ``saekit eval-ioi`` (no torch import, so ``--help`` is fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

from saekit.errors import ConfigError


@dataclass
class EvalOptions:
    """What ``saekit eval`` measures."""

    tokens: int = 65536
    """Evaluation tokens (held-out text of the dataset)."""
    seq_len: int = 128
    """Tokens per sequence (BOS included)."""
    seed: int = 0
    """Seed of the held-out text stream."""
    heldout_frac: float = 0.01
    """Local files and hub datasets without a validation/test split: the held-out share of documents; use the value the SAE was trained with."""

    def __post_init__(self):
        if not 0 < self.heldout_frac < 1:
            raise ConfigError(f"--heldout-frac must be between 0 and 1 (exclusive), not {self.heldout_frac}")
        if self.tokens < self.seq_len or self.seq_len < 2:
            raise ConfigError(f"--tokens ({self.tokens}) must be at least --seq-len ({self.seq_len}) and "
                              "--seq-len at least 2")


@dataclass
class IOIEvalOptions:
    """What ``saekit eval-ioi`` measures."""

    node: list[str] = field(default_factory=list)
    """Nodes to score (L5.END, L4H1.S2, ...); default: the SAE's layer at END and the IOI
    heads found in that layer."""
    n: int = 2000
    """Evaluation prompts (each with io, s and pos counterfactuals)."""
    n_fit: int = 4000
    """Prompts that fit the supervised dictionaries and the latents' F1 interpretations."""
    n_table: int = 500
    """Prompts used to find the nodes by mean ablation."""
    seed: int = 0
    """Seed of the prompt draws."""
    save_dictionaries: bool = True
    """Save the supervised dictionaries beside the SAE (ioi_dictionaries/)."""

    def __post_init__(self):
        if min(self.n, self.n_fit, self.n_table) < 10:
            raise ConfigError("--n, --n-fit and --n-table must each be at least 10")
