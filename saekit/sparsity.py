"""Sparsifiers: the one part in which the TopK-family SAE variants differ.

A sparsifier turns a batch's pre-activations into a sparse code, and does nothing else: it
never sees the SAE, runs no autograd and does no auxiliary work. It is a small ``nn.Module``
(so it can hold buffers such as inference thresholds, saved with the SAE) chosen by name
from ``SAEConfig.sparsity``: ``topk``, ``gtopk``, ``mutual_choice`` (also named ``batchtopk``,
and ``matryoshka``, whose difference is in its loss), ``feature_choice``. The architectures
whose latents fire each on its own (standard, JumpReLU, Gated) are ``saekit.elementwise``.

    codes = sparsifier.select(pre, effect=None, update=False)

``pre`` is a ``saekit.kernels.PreActivations``, the batch's pre-activations, which make
themselves only as far as a selection asks (``pre.topk(k)``, ``pre.global_topk(n)``,
``pre.column_topk(m)``, or the dense ``pre.dense()``); ``effect`` [B, d_sae] is each latent's
first-order effect on the loss, ``|∂L/∂x · W_dec[j]|``, which the SAE computes for
sparsifiers with ``uses_grad`` (g-SAE) when a gradient is given. The returned ``Codes`` hold
plain values; ``SAE.encode`` gives them the encoder's sparse backward.

Training-time statistics (Mutual and Feature Choice's inference thresholds, Feature Choice's
firing frequencies) change only when the caller passes ``update=True``, which the trainer's
step alone does: an ``encode`` from user code never moves them, in train mode or not.

Batch-level sparsifiers (Mutual and Feature Choice) give each token a varying number of
latents; their codes are padded to the widest row with zero values, and ``Codes.lengths``
tells the kernels where each row's padding starts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saekit.elementwise import RULES
from saekit.kernels import PreActivations, topk_lower_index
from saekit.types import FIRING_THRESHOLD, Codes, SAEConfig


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


class TopK(nn.Module):
    """Each token keeps its ``k`` largest ReLU pre-activations (Gao et al. 2024), through
    ``PreActivations.topk``: the fused Triton kernel on CUDA, the bf16 screen on CPUs where
    it pays, else the dense product and an exact top-k."""

    uses_grad = False  # weighs the loss gradient ∂L/∂x in its selection (the data must carry it)
    batch_level = False  # selects across the batch (data parallelism could not reproduce it)
    row_topk = True  # ranks ``k`` latents a row through PreActivations.topk (the fused kernel's limit applies)

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.k = cfg.k

    def select(self, pre: PreActivations, effect: Tensor | None = None, update: bool = False) -> Codes:
        return Codes(*pre.topk(self.k))


class GradientTopK(nn.Module):
    """g-SAE (Olmo et al. 2024): TopK whose *selection* also weighs each latent's effect on
    the loss; the kept values are the plain activations.

        s = a ⊙ (1 + β·|g @ W_decᵀ| / rms),   a = ReLU(pre),   g = ∂L/∂x

    saekit's formulation (methods.md §5): L is the next-token loss summed over positions;
    ``grad_norm="rms"`` divides ``|g @ W_decᵀ|`` (``effect``) by its root-mean-square over
    latents per token (β becomes scale-free), ``"none"`` keeps raw values. Without a gradient
    (inference without labels) it is exactly TopK."""

    uses_grad, batch_level, row_topk = True, False, True

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.k, self.beta, self.grad_norm = cfg.k, cfg.variant.beta, cfg.variant.grad_norm
        self.uses_grad = self.beta != 0  # at β = 0 it is TopK: the SAE need not compute the effect

    def scores(self, pre: Tensor, effect: Tensor) -> Tensor:
        """The selection scores ``s`` [B, d_sae] from the dense pre-activations, in place in
        ``effect`` (``a·(1 + β·e) = max(pre·(1 + β·e), 0)`` since ``1 + β·e > 0``)."""
        with torch.no_grad():
            s = effect
            if self.grad_norm == "rms":
                s.div_(torch.linalg.vector_norm(s, dim=1, keepdim=True).div_(s.shape[1] ** 0.5).clamp_min_(1e-12))
            return s.mul_(self.beta).add_(1).mul_(pre).clamp_min_(0)

    def select(self, pre: PreActivations, effect: Tensor | None = None, update: bool = False) -> Codes:
        if effect is None or self.beta == 0:
            return Codes(*pre.topk(self.k))
        with torch.no_grad():
            dense = pre.dense()
            idx = topk_lower_index(self.scores(dense, effect), self.k)[1]
            return Codes(dense.gather(1, idx).relu_(), idx)


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

    BatchTopK (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders", §3) is the same rule —
    the top k·B activations of the batch in training, one global threshold θ at inference —
    so ``sparsity="batchtopk"`` is this class under a second name. Where saekit differs from
    that paper: the paper estimates θ as the average of the smallest kept positive activation
    over training batches; saekit's θ is an exponential moving average of each batch's
    smallest kept value (``threshold_decay``, 0.9), an average weighted to the last batches.

    The batch-wide selection is ``PreActivations.global_topk`` (not a full sort; on CPUs
    with AMX through a bf16 product); the codes carry
    ``lengths``, so decoding and the backward pass work on the k·B entries only (the
    PyTorch kernels; the Triton ones run the zero-padded form)."""

    uses_grad, batch_level, row_topk = False, True, False

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.k, self.mode, self.decay = cfg.k, cfg.variant.mc_mode, cfg.variant.threshold_decay
        self.register_buffer("theta", torch.zeros(()))
        self.register_buffer("theta_set", torch.zeros((), dtype=torch.bool))

    def select(self, pre: PreActivations, effect: Tensor | None = None, update: bool = False) -> Codes:
        B, d_sae = pre.x.shape[0], pre.W_enc.shape[1]
        if self.training or self.mode == "batch":
            rows, cols, values = pre.global_topk(min(self.k * B, B * d_sae))
            values = values.relu_()  # ranking pre keeps the same positive entries as ReLU(pre)
            if self.training and update:
                _ema_(self.theta, values.min(), self.decay, self.theta_set)
            return pairs_to_codes(values, rows, cols, B)
        dense = pre.dense()
        return mask_to_codes(dense, dense > self.theta)  # theta >= 0: the same as ReLU(pre) > theta


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
    ``PreActivations.column_topk`` (on CPUs with AMX through a bf16 product); the codes
    carry ``lengths``."""

    uses_grad, batch_level, row_topk = False, True, False

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

    def select(self, pre: PreActivations, effect: Tensor | None = None, update: bool = False) -> Codes:
        B = pre.x.shape[0]
        if not self.training:
            dense = pre.dense()
            return mask_to_codes(dense, dense > self.theta)  # theta >= 0: the same as ReLU(pre) > theta
        # zipf capacities rank latents by how often ReLU(pre) fires, which needs the dense
        # pre-activations; once they are made, the selection ranks them too (no screen)
        counting = update and self.capacity == "zipf"
        if counting:
            pre.dense()
        rows, cols, values, smallest = pre.column_topk(self.capacities(B))
        codes = pairs_to_codes(values.relu_(), rows, cols, B)  # ranking pre keeps ReLU(pre)'s positive entries
        if update:
            self._update(smallest.relu_(), pre.dense() if counting else None)
        return codes

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


# Each sparsifier by the name ``SAEConfig.sparsity`` gives it (types.SparsityName lists the
# same names for the command line's choices). A class states what the rest of saekit must know
# about it in three class attributes, ``uses_grad``, ``batch_level`` and ``row_topk`` (TopK's).
SPARSIFIERS: dict[str, type[nn.Module]] = {
    "topk": TopK, "gtopk": GradientTopK, "mutual_choice": MutualChoice, "feature_choice": FeatureChoice,
    "batchtopk": MutualChoice,  # BatchTopK (Bussmann et al. 2024) is Mutual Choice's rule: one implementation
    "matryoshka": MutualChoice,  # BatchTopK's selection; its nested prefix losses are in training.losses
}


# Every architecture's activation class by name, selections and elementwise rules alike: what
# the data path and data parallelism ask of it (uses_grad, batch_level) reads from here.
ACTIVATIONS: dict[str, type] = {**SPARSIFIERS, **RULES}


def make_sparsifier(cfg: SAEConfig) -> nn.Module:
    return SPARSIFIERS[cfg.sparsity](cfg)
