"""Entry points: ``run_training`` (``saekit train``), ``cache_activations`` (``saekit cache``)
and ``train_sae`` (train on in-memory activations from Python)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from saekit import data, models
from saekit.activations import (CachedActivations, HookSpec, ModelActivations, TensorActivations, hook_folder,
                                resolve_hook, resolve_hooks, write_cache)
from saekit.errors import ConfigError, SaekitError
from saekit.files import atomic_write_text
from saekit.models import load_model
from saekit.precision import as_dtype, check_device, dtype_name
from saekit.sae import SAE
from saekit.sparsity import ACTIVATIONS
from saekit.training import distributed, preflight
from saekit.training.config import DataOptions, TrainConfig
from saekit.training.summary import summarize
from saekit.training.trainer import FillReader, Job, Trainer, fit, fit_jobs, init_b_dec_
from saekit.types import Batch, SAEConfig


def _model_source(model, d: DataOptions, seed: int, with_grads: bool = False):
    if any(c in d.hook for c in ",*?["):
        raise ConfigError(f"saekit cache takes one hook, not {d.hook!r}; run it once per hook")
    hook = resolve_hook(model, d.hook)
    return hook, _model_activations(model, [hook], d, seed, with_grads)


def _model_activations(model, hooks: list[HookSpec], d: DataOptions, seed: int, with_grads: bool = False):
    tokens = data.token_batches(model.tokenizer, d.dataset, d.seq_len, batch_size=32, seed=seed,
                               heldout_frac=d.heldout_frac)  # never a held-out document
    return ModelActivations(model, hooks, tokens, max(1, d.fill_tokens // (d.seq_len - 1)), with_grads)


def _truncate_metrics(out: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from."""
    path = out / "metrics.jsonl"
    if path.exists():
        rows = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        atomic_write_text(path, "".join(r + "\n" for r in rows))


def _on_writers(ctx, writer: bool, fn):
    """``fn()`` on the ranks that write; its ``SaekitError`` is raised on every rank."""
    result, error = None, None
    if writer:
        try:
            result = fn()
        except SaekitError as e:
            error = e
    distributed.raise_if_any(ctx, error)
    return result


def run_training(cfg: TrainConfig) -> dict:
    """Train an SAE per hook named by ``cfg.data.hook`` (one name, a pattern, or several);
    write the run folder; return the summary (for several hooks ``{hook: summary}``).

    Under ``torchrun`` the ranks train data-parallel (``saekit.training.distributed``), or
    with ``--distribute-hooks`` each rank trains its share of the hooks on the whole data."""
    check_device(cfg.data.device)  # before torchrun's process group, which would fail less plainly
    ctx = distributed.init(cfg.data.device)
    try:
        return _run(cfg, ctx)
    finally:
        distributed.shutdown(ctx)


def _run(cfg: TrainConfig, ctx) -> dict:
    d, out = cfg.data, Path(cfg.run.out)
    spread = cfg.run.distribute_hooks
    dp = ctx.world > 1 and not spread
    writer = ctx.is_main or spread  # ranks that write run folders
    device = ctx.device(d.device)
    _on_writers(ctx, writer, lambda: preflight.check_writable(out))  # before the slow parts
    if ctx.world > 1 and (d.device_map or d.n_devices > 1):
        raise ConfigError("--device-map and --n-devices spread one model over several devices in one process; "
                          "under torchrun each process holds its own: drop them, or run without torchrun")
    torch.manual_seed(cfg.run.seed)
    model, source, hooks, model_name, fill_tokens, dtype = _open_source(cfg, device)
    if dp:
        distributed.check_supported(cfg.sae.sparsity, d.batch_size, ctx.world)
    multi = len(hooks) > 1
    mine = hooks[ctx.rank::ctx.world] if spread else hooks
    folders = [out / hook_folder(h.name) if multi else out for h in mine]
    sae_cfgs = [cfg.sae_for(h.d_in, h.name, h.shape, model_name) for h in mine]
    _on_writers(ctx, writer, lambda: preflight.check_space(
        out, [2 * c.d_in * c.d_sae + c.d_sae + c.d_in for c in sae_cfgs]))
    states = _on_writers(ctx, writer, lambda: [preflight.find_resume_state(f, cfg.run.resume, cfg) for f in folders])
    if dp:
        states = distributed.broadcast_object(ctx, states)
    if not mine:  # more ranks than hooks: nothing for this one
        return {}
    if source is None:
        source = _model_activations(model, mine, d, cfg.run.seed, with_grads=ACTIVATIONS[cfg.sae.sparsity].uses_grad)
    comm = distributed.DataParallel(ctx) if dp else distributed.Collective()
    readers = [distributed.ShardedFillReader(source.view(h.name) if multi else source, d.batch_size,
                                             fill_tokens, cfg.run.seed, comm) if dp
               else FillReader(source.view(h.name) if multi else source, d.batch_size, fill_tokens, cfg.run.seed)
               for h in mine]
    jobs = [_job(cfg, c, st, r, f, comm, writer, device) for c, st, r, f in zip(sae_cfgs, states, readers, folders)]
    if ctx.is_main and not any(states):
        atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=1))
    fit_jobs(jobs, on_log=_loggers(cfg, out) if ctx.is_main else None, harvested=lambda: readers[0].tokens_filled,
             writer=writer, comm=comm, progress=cfg.run.progress and ctx.is_main)
    if not writer:
        return {}
    summaries = {}
    for job in jobs:
        job.trainer.sae.save(job.out)
        summaries[job.name] = (summarize(job.trainer.sae, job.trainer, cfg, model, dtype)
                               if cfg.run.eval_tokens else {})
        atomic_write_text(job.out / "summary.json", json.dumps(summaries[job.name], indent=1))
    if multi:
        _merge_summaries(out, hooks)
    return summaries if multi else summaries[mine[0].name]


def _open_source(cfg: TrainConfig, device: str):
    """``(model, source, hooks, model_name, fill_tokens, dtype)``: a cache's source, or the
    model (whose source is built once the ranks know their hooks: ``source`` is then
    ``None``); ``dtype`` is the model's (a cache's: the one it was harvested in)."""
    d = cfg.data
    model = source = None
    if d.from_cache:
        source = CachedActivations(d.from_cache)
        meta = source.meta
        if any(c in d.hook for c in ",*?["):
            raise ConfigError("--from-cache holds one hook's activations; train several hooks from the model")
        asked = as_dtype(d.dtype)
        if asked is not None and asked != source.dtype:
            have = dtype_name(source.dtype)
            raise ConfigError(f"the cache {d.from_cache} holds {have} activations, not --dtype {d.dtype}; omit "
                              f"--dtype (a cache's own is used) or cache again with --dtype {d.dtype}")
        hooks, model_name = [HookSpec(meta["hook_name"], tuple(meta["hook_shape"]))], meta["model_name"]
        fill_tokens, dtype = source.fill_tokens, source.dtype
        if ACTIVATIONS[cfg.sae.sparsity].uses_grad and not meta.get("with_grads"):
            raise ConfigError(f"--sparsity {cfg.sae.sparsity} needs gradients; the cache {d.from_cache} has none "
                              "(make one with `saekit cache --with-grads`)")
    else:
        model = load_model(d.model, device, d.dtype, **d.placement)
        dtype = model.cfg.dtype
        hooks, model_name = resolve_hooks(model, d.hook), models.model_name(model)
        fill_tokens = max(1, d.fill_tokens // (d.seq_len - 1)) * (d.seq_len - 1)
    if len(hooks) > 1 and ACTIVATIONS[cfg.sae.sparsity].uses_grad:
        raise ConfigError(f"--sparsity {cfg.sae.sparsity} harvests gradients for one hook at a time; "
                          "train each hook in its own run")
    if fill_tokens < d.batch_size:
        raise ConfigError(f"a buffer fill holds {fill_tokens} activations, fewer than --batch-size {d.batch_size}")
    return model, source, hooks, model_name, fill_tokens, dtype


def _job(cfg: TrainConfig, sae_cfg: SAEConfig, state: dict | None, reader, folder: Path, comm,
         writer: bool, device: str) -> Job:
    """An SAE and its trainer, resumed from ``state`` or started with ``b_dec`` from the data
    (``--b-dec-init``)."""
    sae = SAE(sae_cfg, seed=cfg.run.seed).to(device)
    trainer = Trainer(sae, cfg, total_steps=cfg.data.total_tokens // cfg.data.batch_size, comm=comm)
    if state:
        trainer.load_state_dict(state["state"])
        if writer:
            _truncate_metrics(folder, trainer.step)
    else:
        if writer:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "metrics.jsonl").unlink(missing_ok=True)
        init_b_dec_(sae, reader.batch_at, cfg.optim.b_dec_init, reader.per_fill, comm)
    comm.broadcast_(sae.parameters())  # replicas start identical
    return Job(trainer, reader.batch_at, folder, sae_cfg.hook_name)


def _merge_summaries(out: Path, hooks: list[HookSpec]) -> None:
    """Write ``out/summary.json`` (``{hook: summary}``) once every hook's summary exists.
    With --distribute-hooks each rank calls this after writing its own, so the last rank to
    finish writes it; no rank waits for another (a wait could outlast the group's timeout)."""
    parts = {h.name: out / hook_folder(h.name) / "summary.json" for h in hooks}
    if all(p.exists() for p in parts.values()):
        atomic_write_text(out / "summary.json", json.dumps(
            {name: json.loads(p.read_text()) for name, p in parts.items()}, indent=1))


def _print_row(row: dict) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def _loggers(cfg: TrainConfig, out: Path):
    """Metric sinks besides metrics.jsonl: the console when there is no progress bar, and
    Weights & Biases when asked (offline unless WANDB_MODE says otherwise)."""
    sinks = [] if cfg.run.progress else [_print_row]
    if cfg.run.wandb:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs the wandb package: pip install wandb") from None
        wandb.init(project="saekit", dir=str(out), config=cfg.to_dict(),
                   mode=os.environ.get("WANDB_MODE", "offline"), resume="allow")
        sinks.append(wandb.log)
    return (lambda row: [s(row) for s in sinks]) if sinks else None


def cache_activations(d: DataOptions, out: str, seed: int = 0, progress: bool = True,
                      with_grads: bool = False) -> Path:
    """Harvest ``d.total_tokens`` activations at ``d.hook`` into ``out`` (``saekit cache``),
    in the model's dtype (``d.dtype``; meta.json records it); ``with_grads`` also stores ∂L/∂x
    for g-SAE training."""
    model = load_model(d.model, d.device, d.dtype, **d.placement)
    hook, source = _model_source(model, d, seed, with_grads)
    shard = source.seqs_per_fill * (d.seq_len - 1)
    n_shards = max(1, d.total_tokens // shard)
    meta = {"hook_name": hook.name, "hook_shape": list(hook.shape), "d_in": hook.d_in,
            "model_name": models.model_name(model), "model": d.model, "dataset": d.dataset,
            "seq_len": d.seq_len, "seed": seed, "with_grads": with_grads}
    bar = None
    if progress:
        bar = tqdm(total=n_shards * shard, unit="tok", unit_scale=True, desc="harvesting")
    try:
        return write_cache(source, out, n_shards, meta, bar)
    finally:
        if bar is not None:
            bar.close()


def _batches_in_order(batches: Iterable[Tensor | Batch]):
    """``(batch_at, first)`` for an iterable of ``[batch, d_in]`` tensors or ``Batch``es, read
    once in order (``batch_at`` ignores its step but names it when the batches run out)."""
    it = (b if isinstance(b, Batch) else Batch(b) if isinstance(b, Tensor) else Batch(*b) for b in batches)
    first = next(it)
    pending = [first]

    def batch_at(step: int) -> Batch:
        if pending:
            return pending.pop()
        batch = next(it, None)
        if batch is None:
            raise ConfigError(f"the batches ran out at step {step}; give more or lower total_tokens")
        return batch

    return batch_at, first


def train_sae(acts: Tensor | Iterable[Tensor | Batch], cfg: TrainConfig | None = None, *,
              grads: Tensor | None = None, hook_name: str = "", model_name: str = "",
              out: str | None = None) -> SAE:
    """Train an SAE on in-memory activations and return it.

    ``acts`` is a ``[n, d_in]`` tensor (shuffled in buffer fills, wrapping around for more
    than one epoch) or an iterable of ``[batch, d_in]`` batches (used in order). ``grads``
    (``[n, d_in]``, ∂L/∂x) go with a tensor for ``gtopk``; an iterable may instead yield
    ``Batch(x, grad)`` pairs (both ``[batch, d_in]``). With no ``cfg``, a tensor gets one
    epoch in batches of ``min(4096, n)``. Nothing is written unless ``out`` is given.
    The SAE comes back in eval mode, as ``load_sae`` gives it."""
    if cfg is None:
        if not isinstance(acts, Tensor):
            raise ConfigError("train_sae on an iterable of batches needs a cfg (for the step count)")
        bs = min(4096, len(acts))
        cfg = TrainConfig()
        cfg.data = dataclasses.replace(cfg.data, batch_size=bs, total_tokens=len(acts) // bs * bs,
                                       fill_tokens=max(bs, min(cfg.data.fill_tokens, len(acts) // bs * bs)))
        cfg.run = dataclasses.replace(cfg.run, progress=False)
    d = cfg.data
    if isinstance(acts, Tensor):
        if acts.dim() != 2:
            raise ConfigError(f"acts must be [n, d_in], got shape {tuple(acts.shape)}")
        d_in = acts.shape[1]
        if grads is not None and grads.shape != acts.shape:
            raise ConfigError(f"grads {tuple(grads.shape)} must have the shape of acts {tuple(acts.shape)}")
        if len(acts) < d.batch_size:
            raise ConfigError(f"{len(acts)} activations are fewer than one batch ({d.batch_size})")
        fill_tokens = min(d.fill_tokens, len(acts)) // d.batch_size * d.batch_size
        reader = FillReader(TensorActivations(acts, fill_tokens, grads), d.batch_size, fill_tokens, cfg.run.seed)
        batch_at = reader.batch_at
    else:
        batch_at, first = _batches_in_order(acts)
        d_in = first.x.shape[1]
    sae = SAE(cfg.sae_for(d_in, hook_name, (), model_name), seed=cfg.run.seed).to(d.device)
    trainer = Trainer(sae, cfg, total_steps=d.total_tokens // d.batch_size)
    if isinstance(acts, Tensor):
        init_b_dec_(sae, batch_at, cfg.optim.b_dec_init, reader.per_fill)
    else:  # an iterable's batches are read once: b_dec starts from the first alone
        init_b_dec_(sae, lambda step: first, cfg.optim.b_dec_init, 1)
    if out:  # metrics.jsonl and checkpoints are written as training goes
        Path(out).mkdir(parents=True, exist_ok=True)
    fit(trainer, batch_at, Path(out) if out else None)
    sae.eval()  # inference rules from here on (Mutual/Feature Choice: the saved thresholds)
    if out:
        sae.save(out)
    return sae
