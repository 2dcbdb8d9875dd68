"""The one training loop, for every SAE variant.

Each step: encode, decode, sum the loss terms, backward, remove the decoder gradient's
component parallel to each row, Adam, renormalize decoder rows. The batch arrives in the dtype
it was buffered in and is cast at the step: encoding and decoding run in ``--sae-dtype``
(``SAE.computing_in``), the loss terms' targets and sums in float32. Dead latents are counted
in tokens since they last fired (an activation above ``FIRING_THRESHOLD``, 1e-3, as in
OpenAI's code); AuxK trains on them.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from saekit.activations import fill_permutation
from saekit.errors import ConfigError, SaekitError
from saekit.kernels import check_impl
from saekit.precision import DTYPES, check_dtype_runs
from saekit.sae import SAE
from saekit.training import checkpoint as ckpt
from saekit.training.config import TrainConfig
from saekit.training.distributed import Collective
from saekit.training.losses import (DEFAULT_L0, DEFAULT_L1, PENALTIES, auxk_loss, encode_with_aux, fvu_loss,
                                    prefix_fvu_loss, zipf_weights)
from saekit.types import FIRING_THRESHOLD, Batch

log = logging.getLogger("saekit.training")


class TrainingDiverged(SaekitError):
    """The loss became non-finite."""


class Interrupted(SaekitError):
    """SIGINT/SIGTERM arrived; a checkpoint was written first."""


def default_lr(d_sae: int) -> float:
    """sparsify's rule: 2e-4 / sqrt(d_sae / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_factor(step: int, total: int, warmup: int, decay_frac: float) -> float:
    """Linear warm-up over ``warmup`` steps, constant, linear decay to 0 over the last
    ``decay_frac`` of the run."""
    w = min(1.0, (step + 1) / warmup) if warmup else 1.0
    decay_start = total * (1 - decay_frac)
    d = 1.0 if step < decay_start else max(0.0, (total - step) / (total - decay_start))
    return w * d


@dataclass
class StepStats:
    loss: float
    fvu: float
    aux: float
    penalty: float  # the terms beside FVU and aux: L1 / L0 / gated's frozen-decoder FVU / matryoshka's prefixes
    l0: float
    dead_frac: float
    lr: float


def _check_kernels(sae: SAE) -> None:
    """Refuse, before step 1, a kernel setting the first encoder call would refuse (impl on
    this device; k above the fused TopK encoder's limit, for the sparsifiers that run it)."""
    c = sae.cfg
    try:
        check_impl(c.impl, sae.W_dec.device, c.k if sae.sparsifier.row_topk else 0)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class Trainer:
    """Owns the SAE, the optimizer and the dead-latent counters; ``fit`` runs the loop over
    ``batch_at(step)``, which returns the step's ``Batch``: activations ``x`` ``[batch, d_in]``
    and, for g-SAEs, their loss gradients ``grad`` ``[batch, d_in]``.

    ``comm`` (``saekit.training.distributed``) makes the step data-parallel: each rank
    passes its rows of the global batch and every batch-wide quantity (FVU denominator,
    gradients, firing counts, logged stats) is summed over ranks; the default is one process."""

    def __init__(self, sae: SAE, cfg: TrainConfig, total_steps: int, comm: Collective | None = None):
        self.sae, self.cfg, self.total_steps = sae, cfg, total_steps
        _check_kernels(sae)
        self.dtype = DTYPES[cfg.optim.sae_dtype]  # the step's compute dtype; the parameters stay as they are
        if self.dtype != sae.W_dec.dtype:
            check_dtype_runs(self.dtype, sae.W_dec.device, "--sae-dtype")
        self.comm = comm or Collective()
        o = cfg.optim
        self.base_lr = o.lr or default_lr(sae.cfg.d_sae)
        # fused: one kernel per parameter instead of a dozen passes (the times a step:
        # benchmarks/RESULTS.md, "Figures moved from docstrings")
        self.opt = torch.optim.Adam(sae.parameters(), lr=self.base_lr, eps=o.adam_eps, fused=True)
        self.k_aux = o.k_aux or max(1, sae.cfg.d_in // 2)
        self.prefix_sizes = o.prefix_sizes(sae.cfg.d_sae) if sae.cfg.sparsity == "matryoshka" else None
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_dec.device)
        self.freq = torch.zeros(sae.cfg.d_sae, device=sae.W_dec.device)  # EMA of firing rate (aux zipf)
        self.step = 0

    # ---- one step ----------------------------------------------------------------------------
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.optim.dead_tokens

    def aux_weights(self) -> Tensor | None:
        """Which latents the auxiliary loss may use, and how much (see ``encode``)."""
        o = self.cfg.optim
        if self.cfg.aux == "auxk":
            return self.dead_mask().float()
        if self.cfg.aux == "zipf":
            return zipf_weights(self.freq, self.dead_mask(), o.zipf_tail_frac, o.zipf_gamma)
        return None

    def penalty_coef(self) -> float:
        """This step's weight λ of an elementwise architecture's sparsity penalty: the set (or
        default) λ, risen linearly from 0 over the first ``sparsity_warmup_frac`` of the run."""
        o, name = self.cfg.optim, self.sae.cfg.sparsity
        coef = (o.l0_coef or DEFAULT_L0) if name == "jumprelu" else (o.l1_coef or DEFAULT_L1[name])
        warmup = o.sparsity_warmup_frac * self.total_steps
        return coef * min(1.0, (self.step + 1) / warmup) if warmup > 0 else coef

    def _selection_terms(self, x_in: Tensor, x: Tensor, grad: Tensor | None, denom: Tensor):
        """The TopK family's step on ``x_in`` (``x`` in the step's dtype): the code (and the
        auxiliary selection) through the sparse kernels; FVU (matryoshka: summed over its
        prefixes) and AuxK / aux_zipf, against the float32 target ``x``."""
        sae, o = self.sae, self.cfg.optim
        weights = self.aux_weights()
        n_aux = int((weights > 0).sum()) if weights is not None else 0
        codes, aux = encode_with_aux(sae, x_in, grad, weights if n_aux else None, min(self.k_aux, n_aux),
                                     update=True)
        if self.prefix_sizes:
            x_hat, terms = prefix_fvu_loss(sae, x, codes, self.prefix_sizes, denom)
        else:
            x_hat = sae.decode(codes)
            terms = fvu_loss(x, x_hat, denom)
        if weights is not None:
            terms |= auxk_loss(sae, x, x_hat, aux, n_aux, self.k_aux, o.aux_coef, denom, o.aux_norm,
                                self.comm.total_variance)
        return terms, codes.values, codes.indices

    def _elementwise_terms(self, x_in: Tensor, x: Tensor, denom: Tensor):
        """The standard, jumprelu and gated step on ``x_in``: dense activations, FVU against
        the float32 ``x`` and the penalty."""
        sae = self.sae
        h = sae.encoder_product(x_in)  # [B, d_sae]
        f = sae.activate(h)
        terms = fvu_loss(x, sae.decode_dense(f), denom)
        terms |= PENALTIES[sae.cfg.sparsity](sae, x, h, f, self.penalty_coef(), denom, len(x) * self.comm.world)
        return terms, f, None

    def train_step(self, x: Tensor, grad: Tensor | None = None) -> StepStats:
        """One step on the batch ``x`` [batch, d_in] (any float dtype; g-SAEs: with ``grad``)."""
        sae, o = self.sae, self.cfg.optim
        lr = self.base_lr * lr_factor(self.step, self.total_steps, o.warmup_steps, o.decay_frac)
        for g in self.opt.param_groups:
            g["lr"] = lr
        sae.train()
        x = x.float()  # the loss's target: a bf16 batch upcasts exactly
        denom = self.comm.total_variance(x)  # of the global batch: each rank's terms are partial sums
        with sae.computing_in(self.dtype):
            x_in = x.to(self.dtype)  # float32: x itself
            if sae.elementwise:
                terms, values, indices = self._elementwise_terms(x_in, x, denom)
            else:
                terms, values, indices = self._selection_terms(x_in, x, grad, denom)
        loss = sum(terms.values())
        with torch.no_grad():  # one reduction for the logged terms and the firing counts
            on = values > 0  # for L0
            fired = values > FIRING_THRESHOLD  # for the dead counters and frequencies
            # dense activations (indices None) count by column; sparse codes by latent index
            counts = fired.sum(0) if indices is None else torch.bincount(indices[fired], minlength=sae.cfg.d_sae)
            aux = terms.get("aux", loss * 0)
            penalty = sum((t for n, t in terms.items() if n not in ("fvu", "aux")), loss * 0)
            packed = self.comm.sum_(torch.cat([
                torch.stack([loss, terms["fvu"], aux, penalty, on.sum().float()]).detach(), counts.float()]))
            loss_all, fvu_all, aux_all, penalty_all, n_on = packed[:5].tolist()
            counts = packed[5:].long()
            n_tok = len(x) * self.comm.world
        if not math.isfinite(loss_all):  # every rank sees the same sum, so all stop together
            raise TrainingDiverged(f"loss became {loss_all} at step {self.step}; lower --lr "
                                   "(the last good checkpoint is kept)")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.comm.sum_grads_(sae.parameters())
        if sae.unit_decoder:
            sae.remove_parallel_grad_()
        self.opt.step()
        if sae.unit_decoder:
            sae.set_decoder_norm_()
        sae.clamp_threshold_()
        with torch.no_grad():  # latents that fired this batch are alive again
            self.tokens_since_fired += n_tok
            self.tokens_since_fired[counts > 0] = 0
            self.freq.mul_(0.99).add_(counts.float() / n_tok, alpha=0.01)
        self.step += 1
        n_dead = int(self.dead_mask().sum())
        return StepStats(loss_all, fvu_all, aux_all, penalty_all, n_on / n_tok, n_dead / sae.cfg.d_sae, lr)

    # ---- state for checkpoints ------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "sae": self.sae.state_dict(), "opt": self.opt.state_dict(),
                "tokens_since_fired": self.tokens_since_fired, "freq": self.freq,
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, s: dict) -> None:
        self.step = s["step"]
        self.sae.load_state_dict(s["sae"])
        self.opt.load_state_dict(s["opt"])
        self.tokens_since_fired.copy_(s["tokens_since_fired"])
        self.freq.copy_(s["freq"])
        torch.set_rng_state(s["torch_rng"])


GEOMEDIAN_SAMPLES = 32_768  # Gao et al. 2024 §A.1 take b_dec's start from this many or more


def geometric_median(x: Tensor, comm: Collective | None = None, iters: int = 200, tol: float = 1e-6) -> Tensor:
    """The point minimising ``Σ_i ‖x_i − m‖`` over the rows of ``x`` (of every rank, under
    data parallelism), by Weiszfeld's iteration from the mean: ``m ← Σ w_i x_i / Σ w_i``
    with ``w_i = 1 / ‖x_i − m‖``. Every rank sees the same sums, so all stop together."""
    comm = comm or Collective()
    x = x.double()
    m = comm.mean_rows(x)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-12)  # [n]
        sums = comm.sum_(torch.cat([w @ x, w.sum().reshape(1)]))
        new = sums[:-1] / sums[-1]
        moved = (new - m).norm().item()
        m = new
        if moved <= tol * max(m.norm().item(), 1e-12):
            break
    return m.float()


def init_b_dec_(sae: SAE, batch_at: Callable[[int], Batch], how: str, max_batches: int,
                comm: Collective | None = None) -> None:
    """Set ``b_dec`` before training: the mean of batch 0's ``x`` (``how="mean"``), or the
    geometric median of enough batches for ``GEOMEDIAN_SAMPLES`` rows, at most ``max_batches``
    (``"geometric_median"``; callers pass the batches of the first fill, so that step 0
    finds its fill still loaded). Gradients (g-SAE) are not read."""
    comm = comm or Collective()
    with torch.no_grad():
        first = batch_at(0).x.float()
        if how == "mean":
            sae.b_dec.copy_(comm.mean_rows(first))
        else:
            n_batches = max(1, min(math.ceil(GEOMEDIAN_SAMPLES / len(first)), max_batches))
            x = torch.cat([first] + [batch_at(s).x.float() for s in range(1, n_batches)])
            sae.b_dec.copy_(geometric_median(x.to(sae.b_dec.device), comm))


class FillReader:
    """Step ``s`` → batch ``s % per_fill`` of shuffled fill ``s // per_fill`` of ``source``
    (a ``Batch``; ``x`` and ``grad`` are shuffled by the same permutation)."""

    def __init__(self, source, batch_size: int, fill_tokens: int, seed: int):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.per_fill = fill_tokens // batch_size
        self._fill_index, self._fill = -1, None
        self.tokens_filled = 0  # activations read (harvested) so far in this process

    def batch_at(self, step: int) -> Batch:
        f, j = divmod(step, self.per_fill)
        if f != self._fill_index:
            self._fill = self.source.fill(f)
            self.tokens_filled += len(self._fill.x)
            self._perm = fill_permutation(len(self._fill.x), self.seed, f)
            self._fill_index = f
        # gather one batch at a time rather than permuting the whole fill: no second copy
        # of the fill (which, with many hooks, is also held by the shared source)
        return self._fill.take(self._perm[j * self.batch_size: (j + 1) * self.batch_size])


@dataclass
class Job:
    """One SAE in a run: its trainer, where its batches come from, and its run folder."""

    trainer: Trainer
    batch_at: Callable[[int], Batch]
    out: Path | None = None
    name: str = ""


def fit(trainer: Trainer, batch_at: Callable[[int], Batch], out: Path | None = None,
        on_log: Callable[[dict], None] | None = None, harvested: Callable[[], int] | None = None) -> None:
    """Run one trainer to ``total_steps`` (see ``fit_jobs``)."""
    fit_jobs([Job(trainer, batch_at, out)], on_log=on_log, harvested=harvested)


def fit_jobs(jobs: list[Job], on_log: Callable[[dict], None] | None = None,
             harvested: Callable[[], int] | None = None, writer: bool = True,
             comm: Collective | None = None, progress: bool | None = None) -> None:
    """Run every job's trainer to ``total_steps``, step by step together (their batches come
    from one model forward); each logs and checkpoints into its ``out`` when ``writer``.

    A job resumed from an older checkpoint than the others trains alone until it catches up.
    ``harvested()`` (optional) gives the activations read so far, shown on the progress bar.
    SIGINT/SIGTERM write a checkpoint and raise ``Interrupted``; under data parallelism
    (``comm``) the ranks agree on stopping, so they stop at the same step. ``progress``
    overrides ``cfg.run.progress`` (only one rank shows a bar)."""
    comm = comm or Collective()
    cfg, total = jobs[0].trainer.cfg, jobs[0].trainer.total_steps
    stop = {"signal": None}

    def handler(signum, frame):
        stop["signal"] = signum

    catch = any(j.out for j in jobs) or comm.world > 1
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if catch else {}
    step = min(j.trainer.step for j in jobs)
    bar = None
    if cfg.run.progress if progress is None else progress:
        bar = tqdm(total=total * cfg.data.batch_size, initial=step * cfg.data.batch_size,
                   unit="tok", unit_scale=True, desc="training", dynamic_ncols=True)
    t0 = time.time()
    try:
        while step < total:
            for job in (j for j in jobs if j.trainer.step == step):
                stats = _step(job)
                if job.trainer.step % cfg.run.log_every == 0 or job.trainer.step == total:
                    _log(job, stats, t0, writer, on_log, len(jobs) > 1)
            step += 1
            if bar is not None:
                bar.update(cfg.data.batch_size)
                extra = {"harvested": f"{harvested() / 1e6:.2f}M"} if harvested else {}
                bar.set_postfix(fvu=f"{stats.fvu:.3f}", l0=f"{stats.l0:.1f}", dead=f"{stats.dead_frac:.2f}", **extra)
            stopping = comm.any(stop["signal"] is not None)
            if step % cfg.run.checkpoint_every == 0 or stopping:
                _checkpoint(jobs, cfg, writer, comm)
            if stopping:
                out = jobs[0].out.parent if len(jobs) > 1 else jobs[0].out
                raise Interrupted(f"stopped by signal {stop['signal'] or 'on another rank'} at step {step}; "
                                  f"checkpoint saved, continue with --resume --out {out}")
    finally:
        if bar is not None:
            bar.close()
        for s, h in old.items():
            signal.signal(s, h)


def _step(job: Job) -> StepStats:
    trainer = job.trainer
    x, grad = job.batch_at(trainer.step).to(trainer.sae.W_dec.device)
    return trainer.train_step(x, grad)


def _log(job: Job, stats: StepStats, t0: float, writer: bool, on_log, named: bool) -> None:
    t = job.trainer
    row = {"step": t.step, "tokens": t.step * t.cfg.data.batch_size, **vars(stats),
           "elapsed_s": round(time.time() - t0, 2)}
    if job.out and writer:
        with open(job.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
    if on_log and writer:
        on_log({"hook": job.name, **row} if named else row)


def _checkpoint(jobs: list[Job], cfg, writer: bool, comm: Collective) -> None:
    """Checkpoint every job; all ranks learn whether the writer failed (else they would wait
    for it forever in the next all-reduce)."""
    error = None
    for job in jobs:
        comm.broadcast_(job.trainer.sae.parameters())  # re-sync replicas (a no-op in one process)
        if job.out and writer and error is None:
            try:
                ckpt.save(job.out, job.trainer.state_dict(), cfg)
            except (OSError, SaekitError) as e:
                error = e
    if comm.any(error is not None):
        if isinstance(error, SaekitError):
            raise error
        why = f" ({error.strerror or error})" if error else " on rank 0"
        raise ckpt.CheckpointWriteError(f"could not write a checkpoint{why}; free space or fix --out, then --resume")
