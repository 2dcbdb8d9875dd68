"""One SAE module; the variants differ only in their sparsifier (``saekit.sparsity``).

    pre = (x − b_dec) @ W_enc + b_enc        # [.., d_sae]
    f   = sparsify(pre)                       # most entries exactly 0
    x̂   = f @ W_dec + b_dec                   # [.., d_in]

Files and state dicts use the SAELens layout (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``)
so they interoperate; ``W_enc`` is stored as its transpose ``W_enc_T`` (see ``SAE.W_enc``).
Activations at ``hook_z`` (``[.., n_heads, d_head]``) are flattened to ``d_in = n_heads·d_head``;
``cfg.hook_shape`` records how to unflatten them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from saekit.errors import ConfigError
from saekit.options import VariantOptions

# A latent counts as firing on a token only when its activation exceeds this (OpenAI's
# sparse_autoencoder counts dead latents the same way): float noise is not firing.
FIRING_THRESHOLD = 1e-3

SparsityName = Literal["topk", "gtopk", "mutual_choice", "feature_choice"]


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is; saved as ``cfg.json`` beside its weights."""

    d_in: int
    """Width of the activation vector (for hook_z: n_heads·d_head)."""
    d_sae: int
    """Number of latents."""
    k: int = 32
    """Latents kept per token (TopK)."""
    sparsity: SparsityName = "topk"
    """Sparsifier: topk, gtopk (g-SAE), mutual_choice, feature_choice."""
    hook_name: str = ""
    """Full TransformerLens hook name the SAE reads, e.g. blocks.5.attn.hook_z."""
    model_name: str = ""
    """Model the SAE was trained on."""
    hook_shape: tuple[int, ...] = ()
    """Per-token shape at the hook, e.g. (n_heads, d_head) for hook_z; () means (d_in,)."""
    impl: Literal["auto", "torch", "triton", "screen"] = "auto"
    """Kernels: auto = Triton on CUDA; on CPU torch, with the bf16-screened exact selections (screen) where AMX makes them faster."""  # noqa: E501 (one-line field docstring)
    variant: VariantOptions = field(default_factory=VariantOptions)
    """Settings of the gtopk, mutual_choice and feature_choice sparsifiers."""

    def __post_init__(self):
        if self.d_in < 1 or self.d_sae < 1:
            raise ConfigError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if not 1 <= self.k <= self.d_sae:
            raise ConfigError(f"k={self.k} must be between 1 and d_sae={self.d_sae}; lower k or raise d_sae")
        if self.hook_shape and math.prod(self.hook_shape) != self.d_in:
            raise ConfigError(f"hook_shape {self.hook_shape} does not flatten to d_in={self.d_in}")
        object.__setattr__(self, "hook_shape", tuple(self.hook_shape))

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


_ROW_BLOCK = 512  # decoder rows per block in remove_parallel_grad_


def _W_enc_to_file(module, state_dict, prefix, local_metadata) -> None:
    """State dicts hold ``W_enc [d_in, d_sae]`` (SAELens' key and shape), not the storage."""
    state_dict[prefix + "W_enc"] = state_dict.pop(prefix + "W_enc_T").t()


def _W_enc_from_file(module, state_dict, prefix, *args) -> None:
    if prefix + "W_enc" in state_dict:  # contiguous, also for load_state_dict(assign=True)
        state_dict[prefix + "W_enc_T"] = state_dict.pop(prefix + "W_enc").t().contiguous()


class SAE(nn.Module):
    """A sparse autoencoder. ``cfg`` fixes its shape, sparsifier and the hook it reads."""

    def __init__(self, cfg: SAEConfig, seed: int | None = None):
        super().__init__()
        from saekit.sparsity import make_sparsifier

        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # [d_sae, d_in], unit rows
        self.W_enc_T = nn.Parameter(W_dec.clone())  # W_enc stored as its rows; Gao et al. init
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.sparsifier = make_sparsifier(cfg)
        self.register_state_dict_post_hook(_W_enc_to_file)
        self.register_load_state_dict_pre_hook(_W_enc_from_file)

    @property
    def W_enc(self) -> Float[Tensor, "d_in d_sae"]:
        """The encoder matrix ``[d_in, d_sae]``, a view of the stored ``W_enc_T [d_sae, d_in]``.

        Stored transposed because the training step's work is per latent: the sparse backward
        builds W_enc's gradient one latent row at a time and fused Adam wants contiguous
        parameters, so ``[d_in, d_sae]`` storage would cost a 37 MB transposed copy of the
        gradient a step at d_sae=12288 (its time on CPU: benchmarks/RESULTS.md, "CPU training
        step"). Reads, in-place edits under
        ``no_grad`` and autograd all work through this view; the gradient lands in
        ``W_enc_T.grad``. State dicts and files use the key ``W_enc`` and the ``[d_in, d_sae]``
        shape, as SAELens does. To replace the weights, copy into the view
        (``sae.W_enc.copy_(new)`` under ``no_grad``) or set ``W_enc_T``; ``sae.W_enc.data = t``
        would only rebind the temporary view."""
        return self.W_enc_T.t()

    def __setattr__(self, name, value):
        if name == "W_enc":
            raise AttributeError("SAE.W_enc is a view of the parameter W_enc_T [d_sae, d_in]; copy into it "
                                 "(with torch.no_grad(): sae.W_enc.copy_(new)) or assign sae.W_enc_T")
        super().__setattr__(name, value)

    # ---- the maths ------------------------------------------------------------------------
    def pre_acts(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode_codes(self, x: Float[Tensor, "batch d_in"], grad: Tensor | None = None) -> Codes:
        """The sparse code of ``x`` (``grad`` = ∂L/∂x, used only by gtopk)."""
        return self.sparsifier.encode(self, x, grad).codes

    def decode_codes(self, codes: Codes) -> Float[Tensor, "batch d_in"]:
        from saekit.kernels import decode_sparse

        return decode_sparse(codes.values, codes.indices, self.W_dec, self.b_dec, impl=self.cfg.impl,
                             lengths=codes.lengths)

    def forward(self, x: Float[Tensor, "... d_in"], grad: Tensor | None = None) -> SAEOutput:
        """Reconstruction and sparse code of ``x`` (any leading shape, flattened inside)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cfg.d_in)
        codes = self.encode_codes(x2, None if grad is None else grad.reshape(-1, self.cfg.d_in))
        x_hat = self.decode_codes(codes).reshape(*lead, self.cfg.d_in)
        return SAEOutput(x_hat, codes)

    def encode(self, x: Float[Tensor, "... d_in"], grad: Tensor | None = None) -> Float[Tensor, "... d_sae"]:
        """Dense feature activations ``f`` (zeros where a latent is off)."""
        lead = x.shape[:-1]
        g = None if grad is None else grad.reshape(-1, self.cfg.d_in)
        codes = self.encode_codes(x.reshape(-1, self.cfg.d_in), g)
        return codes.dense(self.cfg.d_sae).reshape(*lead, self.cfg.d_sae)

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return f @ self.W_dec + self.b_dec

    # ---- hook shapes ----------------------------------------------------------------------
    def flatten_hook(self, act: Tensor) -> Tensor:
        """``[.., *hook_shape] -> [.., d_in]`` (hook_z: heads concatenated)."""
        if len(self.cfg.hook_shape) > 1:
            return einops.rearrange(act, "... h d -> ... (h d)")
        return act

    def unflatten_hook(self, x: Tensor) -> Tensor:
        """``[.., d_in] -> [.., *hook_shape]``, to splice a reconstruction back in."""
        if len(self.cfg.hook_shape) > 1:
            return einops.rearrange(x, "... (h d) -> ... h d", h=self.cfg.hook_shape[0])
        return x

    # ---- constraints used by the trainer ---------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the component of each decoder row's gradient parallel to the row, so a step
        moves along the unit sphere (Gao et al. 2024, §A)."""
        if self.W_dec.grad is None:
            return
        g, W = self.W_dec.grad, self.W_dec
        # In blocks of rows whose temporaries stay in cache: faster on CPU than one bmm (or
        # (g * W).sum(1)) over all rows (benchmarks/RESULTS.md, "Figures moved from docstrings").
        for gb, Wb in zip(g.split(_ROW_BLOCK), W.split(_ROW_BLOCK)):
            gb.addcmul_((gb * Wb).sum(1, keepdim=True), Wb, value=-1)

    # ---- files --------------------------------------------------------------------------
    def save(self, path, format: Literal["saekit", "saelens"] = "saekit") -> None:
        """Write the SAE to folder ``path`` atomically (temporary folder, then rename)."""
        from saekit.formats import save_sae

        save_sae(self, path, format)

    def extra_state(self) -> dict[str, Tensor]:
        """Sparsifier buffers (inference thresholds etc.) saved beside the weights."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("sparsifier.")}

    def __repr__(self) -> str:
        c = self.cfg
        return f"SAE({c.sparsity}, d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}, hook={c.hook_name!r})"
