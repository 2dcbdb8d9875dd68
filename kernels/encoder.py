"""The encoder: `PreActivations` (a batch's selections), `encode_selected` (the sparse
backward of selected activations), and `encode_topk` / `encode_topk_aux` built from the two.
Their plain specification is reference.py.

    pre     = (x - b_dec) @ W_enc + b_enc                        # [B, d_sae]
    indices = the k largest pre per row (ties: lower index wins)  # [B, k] int64
    values  = ReLU(pre[indices])                                 # [B, k], sorted descending

Selection ranks `pre` itself and applies ReLU to the kept values (Gao et al. 2024;
methods.md sec. 1). The scattered sparse code equals scatter(topk(ReLU(pre), k)) always; the
indices differ from that only in rows with fewer than k positive pre-activations, where the
extra entries have value 0 either way. Not building ReLU(pre) saves a full pass over
[B, d_sae] and a fresh tensor of that size (benchmarks/RESULTS.md, "Figures moved from docstrings").

Backward touches only the selected latents (K a row), with g = dL/dvalues
masked by values > 0 and xc = x - b_dec:
    grad b_enc[j]    = sum of g[b, s] over (b, s) with indices[b, s] = j
    grad W_enc[:, j] = sum of g[b, s] * xc[b] over the same (b, s)    (scatter_rows -> W_enc^T)
    grad x[b]        = sum_s g[b, s] * W_enc[:, indices[b, s]]         (gather_rows)
    grad b_dec       = -sum_b grad x[b] = -W_enc @ grad b_enc          (no grad x needed)
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch
from torch import Tensor

from . import screen, screen_batch
from .dispatch import TRITON_MAX_K, log_decision, resolve_impl
from .reference import pre_columns
from .select import column_topk, global_topk, topk_lower_index
from .sparse_rows import check_lengths, gather_rows, scatter_rows


class TopKResult(NamedTuple):
    values: Tensor   # [B, k], ReLU applied, sorted descending, input dtype
    indices: Tensor  # [B, k] int64


# ---- pre-activations and selections -----------------------------------------------------

_tls = threading.local()


def _workspace(shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A reused CPU buffer for the pre-activation matrix, one per thread.

    A fresh [B, d_sae] tensor (200 MB at B=4096, d_sae=12288) pays page faults every step
    on CPU: glibc hands large blocks back to the OS on free (`x @ W_enc` into a fresh tensor
    against a reused one: benchmarks/RESULTS.md, "Figures moved from docstrings"). Only the last
    shape/dtype is kept (one [B, d_sae] buffer per thread). Its users (the TopK encoder here,
    the sparsifiers through `pre_activations`) read what they need from it before the next
    encoder call and keep no view of it. It is made outside inference mode, so that a first
    call under ``torch.inference_mode`` does not leave an inference tensor that later calls
    could not write.
    """
    buf = getattr(_tls, "pre", None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        with torch.inference_mode(False):
            _tls.pre = buf = torch.empty(shape, dtype=dtype)
    return buf


def _pre_from(xc: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """``xc @ W_enc + b_enc`` [B, d_sae], into the thread's workspace on CPU."""
    out = _workspace((xc.shape[0], W_enc.shape[1]), xc.dtype) if xc.device.type == "cpu" else None
    return torch.addmm(b_enc, xc, W_enc, out=out)


class PreActivations:
    """The pre-activations ``(x − b_dec) @ W_enc + b_enc`` of one batch x [B, d_in], for
    selections: made without autograd, only as far as a selection needs them, at most once.

    Every method returns plain tensors without gradients; ``encode_selected`` gives the
    selected values their sparse backward. ``impl`` and ``k`` (the latents a row keeps, on
    average) decide the path (``encoder_impl``): ``topk``, ``global_topk`` and
    ``column_topk`` rank through the bf16 screen (screen.py, screen_batch.py) where it
    pays and the dense matrix has not been made, else the dense matrix (``dense``);
    ``columns`` reads the dense matrix when made, else a product over those columns.

    On CPU the dense matrix lives in this thread's reused workspace (`_workspace`): it
    holds until the next encoder call on the thread, which ``dense`` checks."""

    def __init__(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, impl: str = "auto", k: int = 1):
        _validate(x, W_enc, b_enc, b_dec, k)
        self.x, self.W_enc, self.b_enc, self.b_dec, self.k = x, W_enc, b_enc, b_dec, k
        self.requested = impl
        self._impl = self._xc = self._dense = None

    @property
    def impl(self) -> str:
        """The path this batch's selections take: "torch", "screen" or "triton"."""
        if self._impl is None:
            self._impl = encoder_impl(self.requested, self.x, self.W_enc, self.k)
        return self._impl

    @property
    def xc(self) -> Tensor:
        if self._xc is None:
            with torch.no_grad():
                self._xc = self.x - self.b_dec
        return self._xc

    def dense(self) -> Tensor:
        """The whole [B, d_sae] matrix (this thread's workspace on CPU: read, do not keep)."""
        if self._dense is None:
            with torch.no_grad():
                self._dense = _pre_from(self.xc, self.W_enc, self.b_enc)
            self._stamp = _tls.stamp = getattr(_tls, "stamp", 0) + 1
        elif self._dense.device.type == "cpu" and _tls.stamp != self._stamp:
            raise RuntimeError("these pre-activations were overwritten by a later encoder call on this thread; "
                               "select from them before encoding another batch")
        return self._dense

    def columns(self, cols: Tensor) -> Tensor:
        """The pre-activations of latents ``cols`` [B, len(cols)]."""
        if self._dense is not None:
            return self.dense().index_select(1, cols)
        with torch.no_grad():
            return pre_columns(self.xc, self.W_enc, self.b_enc, cols)

    @torch.no_grad()
    def topk_among(self, cols: Tensor, k: int, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per row the ``k`` largest pre-activations among latents ``cols`` (ascending; k <=
        len(cols)), ranked by ``weights ⊙ pre`` where weights [len(cols)] are given, ties to
        the lower index, ReLU on the values: (values [B, k], latent indices [B, k]). The
        auxiliary losses' selection (AuxK: the dead latents; aux_zipf: weighted)."""
        pre_c = self.columns(cols)  # [B, len(cols)]
        pos = topk_lower_index(pre_c if weights is None else pre_c * weights, k)[1]
        return pre_c.gather(1, pos).relu_(), cols[pos]

    @torch.no_grad()
    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """Per row the ``k`` largest pre-activations, ties to the lower index, ReLU on the
        values: (values [B, k] sorted descending, indices [B, k]); reference.encode_topk."""
        impl = _topk_impl(self.impl, k)
        out = None
        if impl == "triton" and self._dense is None:
            from .encoder_triton import encoder_topk_triton

            out = encoder_topk_triton(self.x, self.W_enc, self.b_enc, self.b_dec, k)
        elif impl == "screen" and self._dense is None and self.x.dtype == torch.float32:
            out = screen.screened_select(self.xc, self.W_enc, self.b_enc, k)
        if out is None:
            out = topk_lower_index(self.dense(), k)
        return out[0].relu_(), out[1]

    @torch.no_grad()
    def global_topk(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, cols, values) of the batch's ``n`` largest pre-activations (reference.global_topk)."""
        if self._screens():
            picked = screen_batch.screened_global_topk(self.xc, self.W_enc, self.b_enc, n)
            if picked is not None:
                return picked
        return global_topk(self.dense(), n)

    @torch.no_grad()
    def column_topk(self, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each latent j's ``m[j]`` largest pre-activations over the batch: (rows, cols,
        values) and each latent's m[j]-th value (reference.column_topk)."""
        if self._screens():
            picked = screen_batch.screened_column_topk(self.xc, self.W_enc, self.b_enc, m)
            if picked is not None:
                return picked
        return column_topk(self.dense(), m)

    def _screens(self) -> bool:
        return self._dense is None and self.x.dtype == torch.float32 and self.impl == "screen"


# ---- autograd ---------------------------------------------------------------------------


def _sparse_backward(ctx, xc: Tensor, W_enc: Tensor, sel: list, lengths: Tensor | None = None) -> tuple:
    """Gradients wrt (x, W_enc, b_enc, b_dec) of ReLU'd pre-activations selected at
    ``sel = [(grad [B, K], values [B, K], indices [B, K]), ...]``: O(B·K·d_in) work, or
    O(nnz·d_in) for one ragged selection (``lengths``, see sparse_rows)."""
    x_dtype, b_dec_dtype = ctx.dtypes
    need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
    if not sel:
        return (None,) * 4
    # Gradient wrt the selected pre-activations; ReLU passes it where the value is > 0.
    g_BK = torch.cat([g.float() * (v > 0) for g, v, _ in sel], 1)   # [B, K]
    idx_BK = sel[0][2] if len(sel) == 1 else torch.cat([i for _, _, i in sel], 1)  # [B, K]
    d_sae = W_enc.shape[1]
    grad_b_enc = torch.zeros(d_sae, dtype=torch.float32, device=W_enc.device)
    grad_b_enc.index_add_(0, idx_BK.reshape(-1), g_BK.reshape(-1))
    grad_x = grad_W = grad_b_dec = None
    if need_W:
        # Built as W_enc^T rows ([d_sae, d_in], contiguous) and returned as its [d_in, d_sae]
        # view: no copy when W_enc is stored that way (saekit.SAE.W_enc_T), else autograd
        # copies it into W_enc's layout.
        grad_W = scatter_rows(idx_BK, g_BK, xc, d_sae, ctx.impl, lengths).t().to(W_enc.dtype)
    if need_x:
        grad_xc = gather_rows(idx_BK, g_BK, W_enc.t(), ctx.impl, lengths)  # [B, d_in]
        grad_x = grad_xc.to(x_dtype)
        grad_b_dec = -grad_xc.sum(0) if need_b_dec else None
    elif need_b_dec:
        grad_b_dec = -(W_enc.float() @ grad_b_enc)
    return (grad_x, grad_W, grad_b_enc.to(W_enc.dtype) if need_b_enc else None,
            None if grad_b_dec is None else grad_b_dec.to(b_dec_dtype))


class _EncodeSelected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, values, indices, impl, lengths):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x - b_dec, W_enc, values, indices, lengths)
        ctx.dtypes = (x.dtype, b_dec.dtype)
        ctx.impl = impl
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        xc, W_enc, values, indices, lengths = ctx.saved_tensors
        sel = [(g, values, indices)] if g is not None and indices.shape[1] > 0 else []
        return (*_sparse_backward(ctx, xc, W_enc, sel, lengths), None, None, None, None)


def encode_selected(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, values: Tensor, indices: Tensor,
                    *, impl: str = "auto", lengths: Tensor | None = None) -> Tensor:
    """The encoder's activations at latents the caller selected, with `encode_topk`'s sparse
    backward. Same as ``ReLU((x - b_dec) @ W_enc + b_enc).gather(1, indices)`` given that
    ``values`` [B, K] are those numbers, computed without autograd (batch-level sparsifiers
    need the dense pre-activations to select, but not a dense backward). Padding entries
    (value 0) get no gradient; with ``lengths`` [B] (row b's entries are its first
    lengths[b]) the backward skips them, O(nnz·d_in). x [B, d_in]; indices [B, K] int64."""
    _validate(x, W_enc, b_enc, b_dec, 1)
    if values.shape != indices.shape or values.shape[0] != x.shape[0]:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must be [B={x.shape[0]}, K]")
    if lengths is not None:
        check_lengths(lengths, (x.shape[0],), indices.shape[1])
    impl = resolve_impl(impl, x.device, x.dtype, indices.shape[1])
    return _EncodeSelected.apply(x, W_enc, b_enc, b_dec, values.detach(), indices, impl, lengths)


def _validate(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> None:
    d_in, d_sae = W_enc.shape
    if x.shape[-1] != d_in or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise ValueError(
            f"shapes: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
            f"b_dec {tuple(b_dec.shape)}; expected x [..., d_in], W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in]"
        )
    if not (x.dtype == W_enc.dtype == b_enc.dtype == b_dec.dtype):
        raise ValueError(f"x, W_enc, b_enc, b_dec must share one dtype, got {x.dtype}, {W_enc.dtype}, "
                         f"{b_enc.dtype}, {b_dec.dtype}")
    if not 1 <= k <= d_sae:
        raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")


def encoder_impl(impl: str, x: Tensor, W_enc: Tensor, k: int) -> str:
    """The impl a TopK-style selection of k latents a row runs for x [B, d_in]: resolve_impl,
    and "auto" on CPU takes the bf16 screen where it pays (screen.pays) and this platform's
    bf16 matmul passes the fp32-accumulation probe (screen.bf16_accumulates_in_fp32; else
    the fp32 path, logged). "screen" is refused where the probe fails; it applies to fp32
    only, other dtypes run it as "torch"."""
    resolved = resolve_impl(impl, x.device, x.dtype, k)
    if resolved == "screen":
        _require_sound_screen()
    elif impl == "auto" and resolved == "torch":
        if screen.pays(x, W_enc, k):
            if screen.bf16_accumulates_in_fp32():
                resolved = "screen"
                log_decision("auto", resolved, "cpu encoder, AMX")
            else:
                log_decision("auto", resolved,
                             "cpu encoder, AMX, but the bf16 matmul fails the fp32-accumulation probe")
    return resolved


def _require_sound_screen() -> None:
    if not screen.bf16_accumulates_in_fp32():
        raise ValueError("impl='screen' needs a bf16 matmul that accumulates in fp32, and this platform's does not "
                         "(a probe product leaves the screen's error bound); use impl='auto' or 'torch'")


def topk_impl(impl: str, x: Tensor, W_enc: Tensor, k: int) -> str:
    """The impl ``encode_topk(x, W_enc, ..., k, impl=impl)`` runs its selection with, for x
    [B, d_in]: "torch", "screen" or "triton" (what "auto" resolves to, for benchmarks and
    logs; raises what encode_topk would raise for an impl it refuses)."""
    return _topk_impl(encoder_impl(impl, x, W_enc, k), k)


def _topk_impl(resolved: str, k: int) -> str:
    """The TopK selection's impl: the fused Triton kernel holds k <= TRITON_MAX_K keys a
    row, so "triton" refuses a wider k."""
    if resolved == "triton" and k > TRITON_MAX_K:
        raise ValueError(_too_wide(k))
    return resolved


def _too_wide(k: int) -> str:
    return (f"impl='triton' supports k <= {TRITON_MAX_K} (the fused TopK encoder keeps k keys a row in "
            f"registers), got k={k}; use impl='auto' or 'torch'")


def check_impl(impl: str, device: torch.device | str, topk_k: int = 0) -> None:
    """Raise now, as a one-line ValueError, what the kernels would raise at their first call
    with ``impl`` on ``device``: k > TRITON_MAX_K under impl="triton" for a TopK encoder
    selecting ``topk_k`` latents a row (0: none runs; checked first, as it holds on every
    machine), resolve_impl's refusals, and "screen" where the bf16 matmul fails its probe.
    Callers configuring a run (the trainer) call it before step 1."""
    if impl == "triton" and topk_k > TRITON_MAX_K:
        raise ValueError(_too_wide(topk_k))
    if resolve_impl(impl, device) == "screen":
        _require_sound_screen()


def encode_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, *, impl: str = "auto") -> TopKResult:
    """TopK encoder: the k largest of (x - b_dec) @ W_enc + b_enc per row, ReLU on the values
    (reference.encode_topk).

    x [..., d_in]; W_enc [d_in, d_sae]; b_enc [d_sae]; b_dec [d_in]; fp32 or bf16 (one dtype).
    Returns TopKResult(values [..., k] sorted descending in x's dtype, indices [..., k] int64); among
    equal values the lower latent index wins. Differentiable wrt x, W_enc, b_enc, b_dec
    through `values`; the backward touches only the selected latents.
    impl: "auto" | "torch" | "triton" | "screen" (see resolve_impl).
    """
    lead = x.shape[:-1]
    pre = PreActivations(x.reshape(-1, x.shape[-1]), W_enc, b_enc, b_dec, impl, k)
    values, indices = pre.topk(k)
    values = _attach(pre, values, indices, k)
    return TopKResult(values.unflatten(0, lead), indices.unflatten(0, lead))


def encode_topk_aux(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int,
    dead_mask: Tensor, k_aux: int, *, impl: str = "auto",
) -> tuple[TopKResult, TopKResult]:
    """`encode_topk` plus the AuxK selection (Gao et al. 2024): per row the top-k_aux of
    ReLU(pre) among latents where dead_mask [d_sae] (bool) is True, ties to the lower index
    (from the dense pre-activations where the TopK selection made them, else from a product
    over the dead columns alone; any k_aux on every impl). x [B, d_in].

    k_aux is clipped to the number of dead latents (0 dead -> aux tensors of width 0). Both
    results are differentiable the same way, through one sparse backward over both
    selections; their gradients add up in W_enc, b_enc, x, b_dec.
    """
    if dead_mask.shape != (W_enc.shape[1],) or dead_mask.dtype != torch.bool:
        raise ValueError(f"dead_mask must be a bool [d_sae={W_enc.shape[1]}] tensor, got {dead_mask.dtype} "
                         f"{tuple(dead_mask.shape)}")
    if k_aux < 0:
        raise ValueError(f"k_aux must be >= 0, got {k_aux}")
    pre = PreActivations(x, W_enc, b_enc, b_dec, impl, k)
    values, indices = pre.topk(k)
    dead = dead_mask.nonzero().flatten()  # ascending, so the tie rule carries over
    k_aux = min(k_aux, len(dead))
    if k_aux:
        aux_values, aux_indices = pre.topk_among(dead, k_aux)
    else:
        aux_values, aux_indices = x.new_empty(x.shape[0], 0), dead.new_empty(x.shape[0], 0)
    both = _attach(pre, torch.cat([values, aux_values], 1), torch.cat([indices, aux_indices], 1), k)
    return TopKResult(both[:, :k], indices), TopKResult(both[:, k:], aux_indices)


def _attach(pre: PreActivations, values: Tensor, indices: Tensor, k: int) -> Tensor:
    """``values`` selected on ``pre``'s path with the encoder's sparse backward."""
    impl = _topk_impl(pre.impl, k)
    return _EncodeSelected.apply(pre.x, pre.W_enc, pre.b_enc, pre.b_dec, values, indices, impl, None)
