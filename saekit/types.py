"""The types every part of saekit shares: what an SAE is (``SAEConfig``, with its variant's
options nested in it), what it computes (``Codes``, ``SAEOutput``) and what it reads
(``Batch``). A leaf: it imports nothing of saekit but its exceptions, so any module may import
it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from saekit.errors import ConfigError

# A latent counts as firing on a token only when its activation exceeds this (OpenAI's
# sparse_autoencoder counts dead latents the same way): float noise is not firing.
FIRING_THRESHOLD = 1e-3

SparsityName = Literal["topk", "gtopk", "mutual_choice", "feature_choice", "batchtopk", "matryoshka",
                       "standard", "jumprelu", "gated"]
ImplName = Literal["auto", "torch", "triton", "screen"]
# The dtypes a model runs in (auto: saekit.precision.model_dtype) and an SAE's step computes in.
ModelDtypeName = Literal["auto", "float32", "bfloat16", "float16"]
SAEDtypeName = Literal["float32", "bfloat16"]
# The architectures whose latents fire each on its own (saekit.elementwise.RULES); the others select.
ELEMENTWISE = ("standard", "jumprelu", "gated")


@dataclass
class VariantOptions:
    """Settings of the gtopk, mutual_choice, feature_choice and jumprelu architectures."""

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
    bandwidth: float = 0.05
    """jumprelu: width ε of the rectangle kernel in the threshold's straight-through gradient (units of the pre-activations)."""  # noqa: E501 (one-line field docstring)

    def __post_init__(self):
        if self.beta < 0 or not 0 <= self.threshold_decay < 1 or self.rerank_every < 1:
            raise ConfigError("need beta >= 0, 0 <= threshold_decay < 1, rerank_every >= 1")
        if not self.bandwidth > 0:
            raise ConfigError(f"--bandwidth must be positive, not {self.bandwidth}")


# A field the command line does not offer (training reads it from the hook).
_NOT_AN_OPTION = {"cmd": False}


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is; saved as ``cfg.json`` beside its weights. A training config holds one
    with ``d_in`` (and possibly ``d_sae``) left 0: training fills them in from the hook."""

    d_in: int = field(default=0, metadata=_NOT_AN_OPTION)
    """Width of the activation vector (for hook_z: n_heads·d_head); 0 until the hook is known."""
    d_sae: int = 0
    """Number of latents; 0 means expansion × d_in."""
    k: int = 32
    """Latents kept per token (the TopK family; mean over the batch for batchtopk; unused by standard, jumprelu, gated)."""  # noqa: E501
    sparsity: SparsityName = "topk"
    """Architecture: topk, gtopk (g-SAE), mutual_choice, feature_choice, batchtopk (the same rule as mutual_choice), matryoshka (batchtopk with nested prefix losses), standard (ReLU + L1), jumprelu, gated."""  # noqa: E501
    hook_name: str = field(default="", metadata=_NOT_AN_OPTION)
    """Full TransformerLens hook name the SAE reads, e.g. blocks.5.attn.hook_z."""
    model_name: str = field(default="", metadata=_NOT_AN_OPTION)
    """Model the SAE was trained on."""
    hook_shape: tuple[int, ...] = field(default=(), metadata=_NOT_AN_OPTION)
    """Per-token shape at the hook, e.g. (n_heads, d_head) for hook_z; () means (d_in,)."""
    impl: ImplName = "auto"
    """Kernels: auto = triton on CUDA for bf16 steps at k <= 64, else torch (on CPU with the bf16-screened exact selections, screen, where AMX makes them faster); triton never builds [batch, d_sae]."""  # noqa: E501 (one-line field docstring)
    variant: VariantOptions = field(default_factory=VariantOptions)
    """Settings of the gtopk, mutual_choice, feature_choice and jumprelu architectures."""

    def __post_init__(self):
        for name in ("d_in", "d_sae"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be at least 0, not {getattr(self, name)}")
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, not {self.k}")
        if self.d_sae and self.k > self.d_sae:
            raise ConfigError(f"k={self.k} must be between 1 and d_sae={self.d_sae}; lower k or raise d_sae")
        if self.hook_shape and math.prod(self.hook_shape) != self.d_in:
            raise ConfigError(f"hook_shape {self.hook_shape} does not flatten to d_in={self.d_in}")
        object.__setattr__(self, "hook_shape", tuple(self.hook_shape))

    @property
    def selected_k(self) -> int | None:
        """``k`` where the architecture selects k latents a token (mean over the batch for the
        batch-level ones); None for the elementwise rules (standard, jumprelu, gated), whose
        ``k`` is unused: their L0 is only measured."""
        return None if self.sparsity in ELEMENTWISE else self.k

    def check_complete(self) -> None:
        """Raise unless the shape is known (``d_in`` and ``d_sae`` positive), as building an SAE needs."""
        if self.d_in < 1 or self.d_sae < 1:
            raise ConfigError(f"an SAE needs positive d_in and d_sae, got d_in={self.d_in}, d_sae={self.d_sae}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown SAE config keys {sorted(unknown)}; is this a saekit cfg.json?")
        if isinstance(d.get("variant"), dict):
            d = {**d, "variant": VariantOptions(**d["variant"])}
        return cls(**d)


class Codes(NamedTuple):
    """Sparse latent activations: ``values[b, j]`` of latent ``indices[b, j]``.
    Padding entries (fewer active latents than columns) have value 0. Batch-level
    sparsifiers also give ``lengths`` [batch]: row b's entries are its first ``lengths[b]``
    columns, and decoding and the backward pass skip the padding after them. Three fields:
    unpack as ``values, indices, lengths = codes``."""

    values: Float[Tensor, "batch n"]
    indices: Tensor  # [batch, n] int64
    lengths: Tensor | None = None  # [batch] int64

    def dense(self, d_sae: int) -> Float[Tensor, "batch d_sae"]:
        out = self.values.new_zeros(self.values.shape[0], d_sae)
        return out.scatter_add_(1, self.indices, self.values)


class SAEOutput(NamedTuple):
    x_hat: Float[Tensor, "batch d_in"]
    codes: Codes


class Batch(NamedTuple):
    """One training batch: activations ``x`` [batch, d_in] and, for g-SAEs, the next-token
    loss's gradient with respect to them, ``grad`` [batch, d_in] (None otherwise)."""

    x: Float[Tensor, "batch d_in"]
    grad: Float[Tensor, "batch d_in"] | None = None

    def take(self, rows) -> "Batch":
        """Rows ``rows`` (an index tensor or a slice) of ``x`` and of ``grad`` alike: one
        index for both keeps every gradient beside its activation."""
        return Batch(self.x[rows], None if self.grad is None else self.grad[rows])

    @staticmethod
    def cat(parts: "list[Batch]") -> "Batch":
        """The rows of ``parts`` one after another (all with gradients or all without)."""
        grads = [p.grad for p in parts]
        return Batch(torch.cat([p.x for p in parts]), None if grads[0] is None else torch.cat(grads))

    def to(self, device) -> "Batch":
        return Batch(self.x.to(device), None if self.grad is None else self.grad.to(device))

    def float(self) -> "Batch":
        return Batch(self.x.float(), None if self.grad is None else self.grad.float())
