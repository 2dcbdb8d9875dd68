"""Sparsifiers: the one part in which SAE variants differ.

A sparsifier turns an input batch into a sparse code. It is a small ``nn.Module`` (so it can
hold buffers such as inference thresholds, saved with the SAE) chosen by name from
``SAEConfig.sparsity``: ``topk``, ``gtopk``, ``mutual_choice``, ``feature_choice``.

``encode(sae, x, grad, aux_weights, k_aux)`` returns the code and, when asked, the auxiliary
selection: per token the top ``k_aux`` of ``aux_weights ⊙ ReLU(pre)`` among latents with a
positive weight (AuxK passes the dead mask as weights; aux_zipf graded weights), whose
values are the plain ``ReLU(pre)``.

Training-time statistics (Mutual and Feature Choice's inference thresholds, Feature Choice's
firing frequencies) change only when the caller passes ``update=True``, which the trainer's
step alone does: an ``encode`` from user code never moves them, in train mode or not.

Batch-level sparsifiers (Mutual and Feature Choice) give each token a varying number of
latents; their codes are padded to the widest row with zero values, and ``Codes.lengths``
tells the kernels where each row's padding starts.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from saekit.sae import FIRING_THRESHOLD, Codes, SAEConfig


class Encoded(NamedTuple):
    codes: Codes
    aux: Codes | None  # the auxiliary-loss selection, when asked for


def mask_to_codes(a: Tensor, mask: Tensor) -> Codes:
    """Codes holding ``a[b, j]`` for every ``mask[b, j]``, rows padded with zeros."""
    rows, cols = mask.nonzero(as_tuple=True)  # row-major already
    return pairs_to_codes(a[rows, cols], rows, cols, a.shape[0])


def pairs_to_codes(values: Tensor, rows: Tensor, cols: Tensor, n_rows: int) -> Codes:
    """Codes holding ``values[i]`` at latent ``cols[i]`` of row ``rows[i]``, grouped by row
    (in the pairs' order within a row), rows padded with zeros, ``lengths`` set. Work and
    memory are O(nnz), not O(B·d_sae)."""
    if len(rows) and bool((rows[1:] < rows[:-1]).any()):
        order = torch.sort(rows, stable=True).indices
        rows, cols, values = rows[order], cols[order], values[order]
    counts = torch.bincount(rows, minlength=n_rows)
    n = max(int(counts.max()) if n_rows else 0, 1)
    pos = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    indices = torch.zeros(n_rows, n, dtype=torch.long, device=rows.device).index_put((rows, pos), cols)
    return Codes(values.new_zeros(n_rows, n).index_put((rows, pos), values), indices, counts)


def aux_select(pre: Tensor | Callable[[Tensor], Tensor], weights: Tensor | None, k_aux: int) -> Codes | None:
    """Top ``k_aux`` of ``weights ⊙ ReLU(pre)`` among latents with weight > 0; values
    ``ReLU(pre)`` (ranking ``weights ⊙ pre`` keeps the same positive entries). ``pre``: the
    dense pre-activations [B, d_sae], or a function giving their columns ``eligible``
    (`_columns`)."""
    if weights is None or k_aux <= 0:
        return None
    eligible = (weights > 0).nonzero().flatten()
    if len(eligible) == 0:
        return None
    pre_e = pre(eligible) if callable(pre) else pre.index_select(1, eligible)  # [B, n_eligible]
    pos = (pre_e * weights[eligible]).topk(min(k_aux, len(eligible)), dim=1).indices
    return Codes(pre_e.gather(1, pos).relu_(), eligible[pos])


def _columns(sae, x: Tensor) -> Callable[[Tensor], Tensor]:
    """Pre-activations of the latents ``cols`` only, ``(x - b_dec) @ W_enc[:, cols] + b_enc[cols]``
    (for the auxiliary selection where no dense pre-activations were made)."""
    from saekit.kernels.encoder import pre_columns

    return lambda cols: pre_columns(x - sae.b_dec, sae.W_enc, sae.b_enc, cols)


def _pre(sae, x: Tensor) -> Tensor:
    """Dense pre-activations without autograd, in the encoder's reused workspace on CPU:
    read what is needed before the next encoder call (kernels.encoder.pre_activations)."""
    from saekit.kernels.encoder import pre_activations

    return pre_activations(x, sae.W_enc, sae.b_enc, sae.b_dec)


def differentiable(sae, x: Tensor, codes: Codes | None) -> Codes | None:
    """``codes`` selected from pre-activations computed without autograd, given values that
    carry the encoder's sparse backward (``kernels.encode_selected``): batch-level and
    gradient-aware selections then train as cheaply as TopK's, with no dense backward."""
    if codes is None or not torch.is_grad_enabled():
        return codes
    from saekit import kernels

    v = kernels.encode_selected(x, sae.W_enc, sae.b_enc, sae.b_dec, codes.values, codes.indices,
                                impl=sae.cfg.impl, lengths=codes.lengths)
    return codes._replace(values=v)


def _is_mask(weights: Tensor) -> bool:
    return bool(((weights == 0) | (weights == 1)).all())


class TopK(nn.Module):
    """Each token keeps its ``k`` largest ReLU pre-activations (Gao et al. 2024).

    Uses ``saekit.kernels.encode_topk``: one dense matrix product and a top-k forward, and a
    backward that touches only the selected latents (the fused Triton kernel on CUDA)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.k, self.impl = cfg.k, cfg.impl

    def encode(self, sae, x: Tensor, grad: Tensor | None = None,
               aux_weights: Tensor | None = None, k_aux: int = 0, update: bool = False) -> Encoded:
        from saekit import kernels

        if aux_weights is None or k_aux <= 0 or not bool((aux_weights > 0).any()):
            top = kernels.encode_topk(x, sae.W_enc, sae.b_enc, sae.b_dec, self.k, impl=self.impl)
            return Encoded(Codes(*top), None)
        if _is_mask(aux_weights):  # AuxK: one fused pass selects both
            top, aux = kernels.encode_topk_aux(x, sae.W_enc, sae.b_enc, sae.b_dec, self.k,
                                               aux_weights > 0, k_aux, impl=self.impl)
            return Encoded(Codes(*top), Codes(*aux))
        with torch.no_grad():  # graded weights (aux_zipf): select from the dense pre-activations
            pre = _pre(sae, x)
            v, i = pre.topk(self.k, dim=1)
            aux = aux_select(pre, aux_weights, k_aux)
        return Encoded(differentiable(sae, x, Codes(v.relu_(), i)), differentiable(sae, x, aux))


class GradientTopK(nn.Module):
    """g-SAE (Olmo et al. 2024): TopK whose *selection* also weighs each latent's effect on
    the loss; the kept values are the plain activations.

        s = a ⊙ (1 + β·|g @ W_decᵀ| / rms),   a = ReLU(pre),   g = ∂L/∂x

    saekit's formulation (methods.md §5): L is the next-token loss summed over positions;
    ``grad_norm="rms"`` divides ``|g @ W_decᵀ|`` by its root-mean-square over latents per
    token (β becomes scale-free), ``"none"`` keeps raw values. Without ``grad`` (inference
    without labels) it is exactly TopK."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.k, self.beta, self.grad_norm, self.impl = cfg.k, cfg.variant.beta, cfg.variant.grad_norm, cfg.impl
        self._topk = TopK(cfg)

    def scores(self, sae, pre: Tensor, grad: Tensor) -> Tensor:
        """The selection scores ``s`` [B, d_sae] from the pre-activations: one dense product
        and in-place passes (``a·(1 + β·e) = max(pre·(1 + β·e), 0)`` since ``1 + β·e > 0``)."""
        with torch.no_grad():
            s = torch.mm(grad.to(sae.W_dec.dtype), sae.W_dec.T).abs_()  # the effect e, [B, d_sae]
            if self.grad_norm == "rms":
                s.div_(torch.linalg.vector_norm(s, dim=1, keepdim=True).div_(s.shape[1] ** 0.5).clamp_min_(1e-12))
            return s.mul_(self.beta).add_(1).mul_(pre).clamp_min_(0)

    def encode(self, sae, x, grad=None, aux_weights=None, k_aux=0, update=False) -> Encoded:
        if grad is None or self.beta == 0:
            return self._topk.encode(sae, x, None, aux_weights, k_aux)
        from saekit.kernels.select import topk_lower_index

        with torch.no_grad():
            pre = _pre(sae, x)
            idx = topk_lower_index(self.scores(sae, pre, grad), self.k)[1]
            codes, aux = Codes(pre.gather(1, idx).relu_(), idx), aux_select(pre, aux_weights, k_aux)
        return Encoded(differentiable(sae, x, codes), differentiable(sae, x, aux))


def _ema_(buf: Tensor, value: Tensor, decay: float, started: Tensor) -> None:
    """In-place exponential moving average; the first update sets the value."""
    if not bool(started):
        buf.copy_(value)
        started.fill_(True)
    else:
        buf.mul_(decay).add_(value * (1 - decay))


class MutualChoice(nn.Module):
    """Mutual Choice (Ayonrinde 2024): the batch's ``k·B`` largest ReLU pre-activations,
    over all tokens and latents together; per-token L0 varies, its mean is ``k``.

    saekit's choice for inference (methods.md §2): ``theta`` is an EMA of the smallest value
    kept per training batch and ``f = pre·1[pre > θ]`` (``mc_mode="threshold"``);
    ``mc_mode="batch"`` keeps the batch rule at inference too.

    The global selection is not a full sort (``kernels.select.global_topk``; on CPUs with
    AMX it ranks through a bf16 product, ``kernels.screen_batch``); the codes carry
    ``lengths``, so decoding and the backward pass work on the k·B entries only (the
    PyTorch kernels; the Triton ones run the zero-padded form)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.k, self.mode, self.decay = cfg.k, cfg.variant.mc_mode, cfg.variant.threshold_decay
        self.register_buffer("theta", torch.zeros(()))
        self.register_buffer("theta_set", torch.zeros((), dtype=torch.bool))

    def batch_select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, cols, values) of the ``k·B`` largest entries of ``pre`` [B, d_sae]."""
        from saekit.kernels.select import global_topk

        B, d_sae = pre.shape
        return global_topk(pre, min(self.k * B, B * d_sae))

    def screened_select(self, sae, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """``batch_select`` of x's pre-activations through the bf16 screen
        (``kernels.screen_batch.screened_global_topk``) where the SAE's impl takes it, else None."""
        from saekit.kernels import screen_batch
        from saekit.kernels.encoder import encoder_impl

        if x.dtype != torch.float32 or encoder_impl(sae.cfg.impl, x, sae.W_enc, self.k) != "screen":
            return None
        B, d_sae = x.shape[0], sae.cfg.d_sae
        return screen_batch.screened_global_topk(x - sae.b_dec, sae.W_enc, sae.b_enc, min(self.k * B, B * d_sae))

    def encode(self, sae, x, grad=None, aux_weights=None, k_aux=0, update=False) -> Encoded:
        with torch.no_grad():
            batch = self.training or self.mode == "batch"
            picked = self.screened_select(sae, x) if batch else None
            pre = _pre(sae, x) if picked is None else None
            if batch:
                rows, cols, values = picked if picked is not None else self.batch_select(pre)
                values = values.relu_()  # ranking pre keeps the same positive entries as ReLU(pre)
                codes = pairs_to_codes(values, rows, cols, len(x))
                if self.training and update:
                    _ema_(self.theta, values.min(), self.decay, self.theta_set)
            else:
                codes = mask_to_codes(pre, pre > self.theta)  # theta >= 0: the same as ReLU(pre) > theta
            aux = aux_select(_columns(sae, x) if pre is None else pre, aux_weights, k_aux)
        return Encoded(differentiable(sae, x, codes), differentiable(sae, x, aux))


class FeatureChoice(nn.Module):
    """Feature Choice (Ayonrinde 2024): each latent ``j`` keeps its ``m_j`` largest
    activations over the batch (a column-wise top-m), ``Σ m_j = k·B``, so every latent fires
    in every batch and none can die.

    saekit's choices (methods.md §3): ``capacity="uniform"`` gives ``m_j = round(k·B/d_sae)``
    (at least 1); ``"zipf"`` gives ``m_j ∝ r_j^(−s)`` normalized to ``k·B``, with ``r_j``
    latent j's rank by its running firing frequency (``_update``), re-ranked every
    ``rerank_every`` training steps.
    Inference: per-latent thresholds ``θ_j`` (EMA of the smallest value latent j kept per
    batch) and ``f_j = pre_j·1[pre_j > θ_j]``. The column-wise selection is
    ``kernels.select.column_topk`` (on CPUs with AMX through a bf16 product,
    ``kernels.screen_batch``); the codes carry ``lengths``."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.k, self.capacity, self.s = cfg.k, cfg.variant.capacity, cfg.variant.zipf_s
        self.rerank_every, self.decay = cfg.variant.rerank_every, cfg.variant.threshold_decay
        self.register_buffer("theta", torch.zeros(cfg.d_sae))
        self.register_buffer("theta_set", torch.zeros((), dtype=torch.bool))
        self.register_buffer("freq", torch.zeros(cfg.d_sae))  # running firing frequency (zipf)
        self.register_buffer("rank", torch.arange(1, cfg.d_sae + 1, dtype=torch.float))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def capacities(self, B: int) -> Tensor:
        """``m_j`` per latent, summing to ``k·B`` (largest-remainder rounding)."""
        d_sae = self.theta.shape[0]
        total = self.k * B
        if self.capacity == "uniform":
            share = torch.full((d_sae,), total / d_sae)
        else:
            w = self.rank.pow(-self.s)
            share = w / w.sum() * total
        m = share.floor().long().clamp(max=B)
        short = total - int(m.sum())
        if short > 0:  # give the remainder to the largest fractional parts
            frac = (share - share.floor()).masked_fill(m >= B, -1)
            m[frac.topk(min(short, d_sae)).indices] += 1
        return m.clamp(1, B)

    def batch_select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(rows, cols, values) of each latent's ``m_j`` largest entries of ``pre`` [B, d_sae],
        ``m`` and each latent's smallest kept value (``kernels.select.column_topk``)."""
        from saekit.kernels.select import column_topk

        m = self.capacities(pre.shape[0])  # [d_sae]
        rows, cols, values, smallest = column_topk(pre, m)
        return rows, cols, values, m, smallest

    def screened_select(self, sae, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
        """``batch_select`` of x's pre-activations through the bf16 screen
        (``kernels.screen_batch.screened_column_topk``) where the SAE's impl takes it, else None."""
        from saekit.kernels import screen_batch
        from saekit.kernels.encoder import encoder_impl

        if x.dtype != torch.float32 or encoder_impl(sae.cfg.impl, x, sae.W_enc, self.k) != "screen":
            return None
        m = self.capacities(x.shape[0])
        picked = screen_batch.screened_column_topk(x - sae.b_dec, sae.W_enc, sae.b_enc, m)
        return None if picked is None else (*picked[:3], m, picked[3])

    def encode(self, sae, x, grad=None, aux_weights=None, k_aux=0, update=False) -> Encoded:
        with torch.no_grad():
            # zipf capacities rank latents by how often ReLU(pre) fires, which needs the dense
            # pre-activations; the screen does not make them
            screen = self.training and not (update and self.capacity == "zipf")
            picked = self.screened_select(sae, x) if screen else None
            pre = _pre(sae, x) if picked is None else None
            if self.training:
                rows, cols, values, m, smallest = picked if picked is not None else self.batch_select(pre)
                # ranking pre keeps the same positive entries as ReLU(pre)
                codes = pairs_to_codes(values.relu_(), rows, cols, len(x))
                if update:
                    self._update(smallest.relu_(), pre)
            else:
                codes = mask_to_codes(pre, pre > self.theta)  # theta >= 0: the same as ReLU(pre) > theta
            aux = aux_select(_columns(sae, x) if pre is None else pre, aux_weights, k_aux)
        return Encoded(differentiable(sae, x, codes), differentiable(sae, x, aux))

    def _update(self, smallest: Tensor, pre: Tensor | None) -> None:
        """One training batch's statistics: the thresholds' EMA and, for zipf capacities,
        the firing frequency and the periodic re-rank.

        The frequency is the share of the batch's tokens on which ``ReLU(pre_j)`` exceeds
        ``FIRING_THRESHOLD`` — how often the latent would fire with no capacity — not the
        share it was allowed to keep (``m_j / B``), which is set by its capacity and would
        re-rank the latents in the order they already have (methods.md §3)."""
        _ema_(self.theta, smallest, self.decay, self.theta_set)
        self.calls += 1
        if self.capacity != "zipf":
            return
        fired = (pre > FIRING_THRESHOLD).sum(0).float() / pre.shape[0]  # [d_sae]
        if int(self.calls) == 1:  # the first batch sets it, as _ema_ does
            self.freq.copy_(fired)
        else:
            self.freq.mul_(self.decay).add_(fired * (1 - self.decay))
        if int(self.calls) % self.rerank_every == 0:
            order = self.freq.argsort(descending=True, stable=True)
            self.rank[order] = torch.arange(1, len(order) + 1, dtype=torch.float, device=pre.device)


SPARSIFIERS: dict[str, type[nn.Module]] = {
    "topk": TopK, "gtopk": GradientTopK, "mutual_choice": MutualChoice, "feature_choice": FeatureChoice,
}


def make_sparsifier(cfg: SAEConfig) -> nn.Module:
    return SPARSIFIERS[cfg.sparsity](cfg)
