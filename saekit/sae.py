"""One SAE module; the architectures differ only in their activation: a selection among
latents (``saekit.sparsity``: TopK, g-TopK, Mutual/Feature Choice, BatchTopK, Matryoshka) or
an elementwise rule (``saekit.elementwise``: standard ReLU, JumpReLU, Gated).

    pre = (x − b_dec) @ W_enc + b_enc        # [.., d_sae]
    f   = sparsify(pre)                       # most entries exactly 0
    x̂   = f @ W_dec + b_dec                   # [.., d_in]

Files and state dicts use the SAELens layout (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``)
so they interoperate; ``W_enc`` is stored as its transpose ``W_enc_T`` (see ``SAE.W_enc``).
Activations at ``hook_z`` (``[.., n_heads, d_head]``) are flattened to ``d_in = n_heads·d_head``;
``cfg.hook_shape`` records how to unflatten them.

``SAE.encode(x, grad=None) -> Codes`` and ``SAE.decode(codes)`` are the one way in, for the
trainer as for analysis: the SAE makes the batch's pre-activations (``pre_activations``),
its sparsifier selects from them, and ``attach`` gives the selected values the encoder's
sparse backward. ``encode_dense`` / ``decode_dense`` are the dense forms.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from saekit import kernels
from saekit.errors import SAEFileError
from saekit.files import CFG, SAEKIT_WEIGHTS, SAELENS_WEIGHTS, atomic_save_tensors, atomic_write_text
from saekit.saelens import to_saelens
from saekit.elementwise import RULES, ElementwiseRule
from saekit.sparsity import SPARSIFIERS, make_sparsifier, mask_to_codes
from saekit.types import FIRING_THRESHOLD, Codes, SAEConfig, SAEOutput, SparsityName, VariantOptions

__all__ = ["FIRING_THRESHOLD", "SAE", "Codes", "SAEConfig", "SAEOutput", "SparsityName", "VariantOptions"]

_ROW_BLOCK = 512  # decoder rows per block in remove_parallel_grad_


def _W_enc_to_file(module, state_dict, prefix, local_metadata) -> None:
    """State dicts hold ``W_enc [d_in, d_sae]`` (SAELens' key and shape), not the storage, and
    the encoder bias under the architecture's SAELens name (gated: ``b_gate``)."""
    state_dict[prefix + "W_enc"] = state_dict.pop(prefix + "W_enc_T").t()
    if module.bias_name != "b_enc":
        state_dict[prefix + module.bias_name] = state_dict.pop(prefix + "b_enc")


def _W_enc_from_file(module, state_dict, prefix, *args) -> None:
    if prefix + "W_enc" in state_dict:  # contiguous, also for load_state_dict(assign=True)
        state_dict[prefix + "W_enc_T"] = state_dict.pop(prefix + "W_enc").t().contiguous()
    if prefix + module.bias_name in state_dict and module.bias_name != "b_enc":
        state_dict[prefix + "b_enc"] = state_dict.pop(prefix + module.bias_name)


# Encoder row norm at the start of the elementwise architectures, and decoder row norm of the
# standard SAE, whose rows train freely (SAELens' decoder_init_norm, W_enc = W_decᵀ). Half of
# these SAEs' latents fire at the start; unit encoder rows would make x̂ dozens of times too
# large (an FVU of ~40 on the embedded model's hook_z) and spend the first hundreds of steps on it.
ELEMENTWISE_INIT_NORM = 0.1


def batch_level_init_norm(d_in: int, d_sae: int) -> float:
    """Encoder row norm at the start of the batch-level selections (Mutual Choice, BatchTopK,
    Matryoshka, Feature Choice): ``min(1, √(2·d_in/d_sae))``, the expected row norm of the
    Kaiming-uniform encoder in Bussmann et al.'s BatchTopK code (bartbussmann/BatchTopK,
    ``sae.py``: entries of variance 2/d_sae over d_in inputs). Their per-token count of active
    latents is not bounded, so at the start the batch's largest-norm tokens take hundreds of
    latents each; with unit rows (Gao et al.'s TopK start) their reconstruction is many times
    too large: an FVU of 5 at the start at 32× on the embedded model's ``blocks.3.attn.hook_z``,
    still above 1 after 124 steps (docs/results.md). With this norm the start's FVU is below 1."""
    return min(1.0, (2 * d_in / d_sae) ** 0.5)


class SAE(nn.Module):
    """A sparse autoencoder. ``cfg`` fixes its shape, its activation (a selection of
    ``saekit.sparsity`` or an elementwise rule of ``saekit.elementwise``) and the hook it reads."""

    def __init__(self, cfg: SAEConfig, seed: int | None = None):
        super().__init__()
        cfg.check_complete()
        self.cfg = cfg
        rule = RULES.get(cfg.sparsity)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc_T = W_dec.clone()  # W_enc stored as its rows [d_sae, d_in]; W_enc = W_decᵀ (Gao et al.)
        if rule is not None:  # most latents fire at the start: a small encoder keeps x̂ near x
            W_enc_T *= ELEMENTWISE_INIT_NORM
            if not rule.unit_decoder:
                W_dec *= ELEMENTWISE_INIT_NORM
        elif SPARSIFIERS[cfg.sparsity].batch_level:  # a token may take many latents at the start
            W_enc_T *= batch_level_init_norm(cfg.d_in, cfg.d_sae)
        self.W_dec = nn.Parameter(W_dec)  # [d_sae, d_in], unit rows (but standard's)
        self.W_enc_T = nn.Parameter(W_enc_T)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if rule is not None:  # an elementwise rule: its parameters on the SAE, under SAELens' names
            self.sparsifier = rule(cfg)
            for name, init in self.sparsifier.init_params(cfg.d_sae).items():
                self.register_parameter(name, nn.Parameter(init))
        else:
            self.sparsifier = make_sparsifier(cfg)
        self.register_state_dict_post_hook(_W_enc_to_file)
        self.register_load_state_dict_pre_hook(_W_enc_from_file)

    @property
    def elementwise(self) -> bool:
        """Whether each latent fires on its own (standard, jumprelu, gated: a dense,
        differentiable rule) rather than by a selection among latents (the TopK family)."""
        return isinstance(self.sparsifier, ElementwiseRule)

    @property
    def unit_decoder(self) -> bool:
        """Whether training keeps decoder rows at unit norm (all but the standard SAE)."""
        return not self.elementwise or self.sparsifier.unit_decoder

    @property
    def bias_name(self) -> str:
        """The encoder bias's name in state dicts and files (SAELens': gated calls it ``b_gate``)."""
        return self.sparsifier.bias_name if self.elementwise else "b_enc"

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
        """``(x − b_dec) @ W_enc + b_enc``, differentiable (for analysis; encoding selects
        through ``pre_activations``)."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def pre_activations(self, x: Float[Tensor, "batch d_in"]) -> kernels.PreActivations:
        """The pre-activations of the rows ``x`` as the sparsifiers select from them
        (``saekit.kernels.PreActivations``: without autograd, made only as far as asked)."""
        return kernels.PreActivations(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.impl, self.cfg.k)

    def effect(self, grad: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        """Each latent's first-order effect on the loss, ``|∂L/∂x · W_dec[j]|``, given
        ``grad`` = ∂L/∂x (what g-SAE's selection weighs); no autograd."""
        with torch.no_grad():
            return torch.mm(grad.to(self.W_dec.dtype), self.W_dec.T).abs_()

    def encoder_product(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        """``h = (x − b_dec) @ W_enc``, differentiable: what an elementwise rule reads."""
        return torch.mm(x - self.b_dec, self.W_enc)

    def activate(self, h: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_sae"]:
        """An elementwise rule's activations ``f`` from ``h`` (``encoder_product``), differentiable."""
        return self.sparsifier(h, self.b_enc, {n: getattr(self, n) for n in self.sparsifier.params})

    def _rule_f(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "batch d_sae"]:
        """An elementwise rule's dense activations of ``x``'s rows (``x.reshape(-1, d_in)``)."""
        return self.activate(self.encoder_product(x.reshape(-1, self.cfg.d_in)))

    def encode(self, x: Float[Tensor, "... d_in"], grad: Tensor | None = None, *,
               pre: kernels.PreActivations | None = None, update: bool = False) -> Codes:
        """The sparse code of ``x``'s rows (``x.reshape(-1, d_in)``), its values carrying the
        encoder's backward: for a selection ``attach(pre, select(...))``, for an elementwise
        rule the nonzero entries of ``encode_dense`` (``grad`` and ``update`` are unused)."""
        if self.elementwise:
            f = self._rule_f(x)
            return mask_to_codes(f, f > 0)
        x = x.reshape(-1, self.cfg.d_in)
        pre = self.pre_activations(x) if pre is None else pre
        return self.attach(pre, self.select(pre, grad, update=update))[0]

    def select(self, pre: kernels.PreActivations, grad: Tensor | None = None, update: bool = False) -> Codes:
        """The sparsifier's selection from ``pre`` (this batch's ``pre_activations``), plain
        values without autograd. ``grad`` = ∂L/∂x, used only by sparsifiers that weigh it
        (gtopk); ``update=True`` (the trainer's step) lets the sparsifier update its training
        statistics."""
        effect = None
        if grad is not None and self.sparsifier.uses_grad:
            effect = self.effect(grad.reshape(-1, self.cfg.d_in))
        return self.sparsifier.select(pre, effect, update=update)

    def attach(self, pre: kernels.PreActivations, *selections: Codes | None) -> list[Codes | None]:
        """``selections`` made from ``pre``, their values given the encoder's sparse backward
        (``kernels.encode_selected``) when autograd is on. The selections that are not ragged
        (no ``lengths``: TopK's codes, the auxiliary losses') share one backward pass over
        their concatenation; a ragged one (Mutual, Feature Choice) gets its own, which skips
        its padding. None stays None."""
        out = list(selections)
        if not torch.is_grad_enabled():
            return out
        joint = [i for i, c in enumerate(selections) if c is not None and c.lengths is None]
        joint = joint if len(joint) > 1 else []
        for i, c in enumerate(selections):
            if c is not None and i not in joint:
                out[i] = c._replace(values=self._selected(pre, c.values, c.indices, c.lengths))
        if joint:
            values = self._selected(pre, torch.cat([out[i].values for i in joint], 1),
                                    torch.cat([out[i].indices for i in joint], 1), None)
            for i, v in zip(joint, values.split([out[i].values.shape[1] for i in joint], 1)):
                out[i] = out[i]._replace(values=v)
        return out

    def _selected(self, pre: kernels.PreActivations, values: Tensor, indices: Tensor, lengths: Tensor | None):
        return kernels.encode_selected(pre.x, self.W_enc, self.b_enc, self.b_dec, values, indices,
                                       impl=self.cfg.impl, lengths=lengths)

    def decode(self, codes: Codes) -> Float[Tensor, "batch d_in"]:
        """The reconstruction ``Σ_j f_j·W_dec[j] + b_dec`` of sparse ``codes``."""
        return kernels.decode_sparse(codes.values, codes.indices, self.W_dec, self.b_dec, impl=self.cfg.impl,
                                     lengths=codes.lengths)

    def forward(self, x: Float[Tensor, "... d_in"], grad: Tensor | None = None) -> SAEOutput:
        """Reconstruction (``x``'s leading shape) and sparse code (one row per vector) of ``x``."""
        if self.elementwise:  # decoded densely: no sparse kernels for these
            f = self._rule_f(x)
            return SAEOutput(self.decode_dense(f).reshape(x.shape), mask_to_codes(f, f > 0))
        codes = self.encode(x, grad)
        return SAEOutput(self.decode(codes).reshape(x.shape), codes)

    def encode_dense(self, x: Float[Tensor, "... d_in"], grad: Tensor | None = None) -> Float[Tensor, "... d_sae"]:
        """Dense feature activations ``f`` (zeros where a latent is off), ``x``'s leading shape."""
        if self.elementwise:
            f = self._rule_f(x)
        else:
            f = self.encode(x, grad).dense(self.cfg.d_sae)
        return f.reshape(*x.shape[:-1], self.cfg.d_sae)

    def decode_dense(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        """``f @ W_dec + b_dec`` for dense activations ``f``."""
        return f @ self.W_dec + self.b_dec

    @contextmanager
    def computing_in(self, dtype: torch.dtype) -> Iterator["SAE"]:
        """Within the block the SAE computes in ``dtype`` (mixed precision with float32 master
        weights): each parameter reads as a ``dtype`` copy made on entry, differentiably, so a
        backward through what the block computed lands in the parameters themselves, which the
        optimizer updates and files store. Parameters already in ``dtype`` read as they are
        (float32: nothing changes). Inputs are the caller's to cast; ``parameters()`` inside the
        block gives the copies: step the optimizer after it."""
        params = self._parameters
        kept = {n: p for n, p in params.items() if p is not None and p.dtype != dtype}
        try:
            for n, p in kept.items():
                # a plain tensor where nn.Module keeps the Parameter: attribute reads (sae.W_dec)
                # see it, as torch.func.functional_call's reparametrisation does
                params[n] = p.to(dtype)
            yield self
        finally:
            params.update(kept)

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
    def clamp_threshold_(self) -> None:
        """Keep JumpReLU's thresholds at or above 0 (a no-op for other architectures)."""
        if "threshold" in self._parameters:
            self.threshold.clamp_min_(0)

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
        """Write the SAE into folder ``path``: ``"saekit"`` (cfg.json + sae.safetensors with the
        sparsifier's buffers: the state dict) or ``"saelens"`` (cfg.json + sae_weights.safetensors
        in SAELens 6's layout for the architecture SAELens runs it as: ``saekit.saelens.to_saelens``),
        each file to a temporary name first, then renamed into place."""
        path = Path(path)
        state = self.state_dict()
        if format == "saekit":
            atomic_save_tensors(path / SAEKIT_WEIGHTS, state)
            atomic_write_text(path / CFG, json.dumps({"format": "saekit", **self.cfg.to_dict()}, indent=1))
        elif format == "saelens":
            cfg, tensors = to_saelens(self.cfg.to_dict(), state)
            atomic_save_tensors(path / SAELENS_WEIGHTS, tensors)
            atomic_write_text(path / CFG, json.dumps(cfg, indent=1))
        else:
            raise SAEFileError(f"unknown format {format!r}; use 'saekit' or 'saelens'")

    def __repr__(self) -> str:
        c = self.cfg
        return f"SAE({c.sparsity}, d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}, hook={c.hook_name!r})"
