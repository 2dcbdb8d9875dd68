"""Activations at a hook point: harvest from a model, buffer, and cache on disk.

Training reads activations in *fills*: fill ``i`` is ``fill_tokens`` activation vectors,
shuffled with a generator seeded by ``(seed, i)``. A fill is a pure function of its index,
so a run can resume at any step by recomputing one fill: step ``s`` reads batch
``s % batches_per_fill`` of fill ``s // batches_per_fill``. Sources:

- ``ModelActivations``: runs the model on a token stream, only up to the hook (a hook that
  stops the forward pass as soon as it has fired);
- ``CachedActivations``: shards written by ``saekit cache`` (one fill per shard), so a run can
  train without the model;
- ``TensorActivations``: an in-memory ``[n, d_in]`` tensor (``train_sae`` from a notebook).

A fill is a ``Batch``: the activations ``x`` and, for g-SAEs, the loss gradients ``grad``
beside them (same rows, same order), never one tensor packing both. Fills keep the dtype the
model ran in (a cache: the dtype it was harvested in; bf16 halves the buffer's memory); the
trainer casts each batch to the SAE's dtype at its step.

The BOS position is left out: its activations are outliers the SAE should not spend
latents on, and splicing leaves that position untouched to match.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import einops
import torch
from torch import Tensor

from saekit.errors import ConfigError, HookError, SAEFileError
from saekit.files import atomic_save_tensors, atomic_write_text, read_json, read_tensors
from saekit.metrics import next_token_loss
from saekit.precision import DTYPES, dtype_name
from saekit.types import Batch

# model -> {hook name: per-token shape}: saekit's cache, not an attribute on the model
_HOOK_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class HookSpec:
    """A hook point and the per-token shape of its activations."""

    name: str
    shape: tuple[int, ...]  # per token, e.g. (n_heads, d_head) for hook_z

    @property
    def d_in(self) -> int:
        return math.prod(self.shape)


def hook_names(model) -> dict[str, tuple[int, ...]]:
    """Every hook name of ``model`` (aliases included) with its per-token shape, from a
    one-token forward pass (cached per model object, in ``_HOOK_SHAPES``)."""
    if model not in _HOOK_SHAPES:
        tokens = torch.tensor([[model.tokenizer.bos_token_id or 0]], device=model.cfg.device)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        # [batch=1, pos=1, *shape] for token-wise hooks; others (attention patterns) keep all axes
        _HOOK_SHAPES[model] = {k: tuple(v.shape[2:]) if v.dim() >= 3 else tuple(v.shape[1:])
                               for k, v in cache.items()}
    return _HOOK_SHAPES[model]


def resolve_hook(model, name: str) -> HookSpec:
    """Check ``name`` exists on ``model``; raise ``HookError`` naming the closest valid hooks."""
    names = hook_names(model)
    if name not in names:
        close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise HookError(f"no hook {name!r} on this model{hint} (`saekit hooks` lists them all)")
    if "pattern" in name or "attn_scores" in name:
        raise HookError(f"{name} is an attention pattern, not a per-token activation; pick another hook")
    return HookSpec(name, names[name])


def resolve_hooks(model, spec: str) -> list[HookSpec]:
    """The hooks named by ``spec``: one name, a pattern with ``*`` (``blocks.*.attn.hook_z``),
    or several of either separated by commas. Patterns expand in the model's forward order;
    a pattern that matches nothing raises ``HookError``."""
    names = hook_names(model)
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "*" in part or "?" in part or "[" in part:
            hits = [n for n in names if fnmatch.fnmatchcase(n, part)]
            if not hits:
                raise HookError(f"no hook matches the pattern {part!r} on this model "
                                "(`saekit hooks` lists them all)")
            out += hits
        else:
            out.append(part)
    if not out:
        raise HookError("--hook is empty; name a hook such as blocks.5.attn.hook_z")
    unique = list(dict.fromkeys(out))  # a hook named twice gets one SAE
    return [resolve_hook(model, n) for n in unique]


def hook_folder(name: str) -> str:
    """Subfolder of a multi-hook run folder holding the SAE of hook ``name``."""
    return name.replace("/", "_")


class _Stop(Exception):
    """Raised inside the hook to end the forward pass once the activation is captured."""


def capture(model, tokens: Tensor, names: list[str]) -> dict[str, Tensor]:
    """Raw activations ``{name: [b, T, *shape]}`` at hooks ``names`` for ``tokens [b, T]``,
    from one forward pass stopped once the last of them has fired."""
    box: dict[str, Tensor] = {}

    def grab(act, hook=None, name=""):
        box[name] = act.detach()
        if len(box) == len(names):
            raise _Stop

    fwd = [(n, (lambda a, hook=None, n=n: grab(a, hook, n))) for n in names]
    with torch.no_grad():
        try:
            model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=fwd)
        except _Stop:
            pass
    missing = [n for n in names if n not in box]
    if missing:
        raise HookError(f"hook {missing[0]} did not fire during the forward pass")
    return box


def _tokens_flat(act: Tensor, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """``[b, T, *shape]`` without the BOS position, as ``[b·(T−1), d_in]`` in ``dtype`` (None:
    the model's)."""
    flat = einops.rearrange(act[:, 1:], "b t ... -> (b t) (...)")
    return flat if dtype is None else flat.to(dtype)


def harvest(model, tokens: Tensor, hook: HookSpec, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """Activations at ``hook`` for ``tokens [b, T]`` (BOS position dropped): ``[b·(T−1), d_in]``,
    in ``dtype`` (float32 by default, what an SAE reads; None keeps the model's)."""
    return _tokens_flat(capture(model, tokens, [hook.name])[hook.name], dtype)


def harvest_many(model, tokens: Tensor, hooks: list[HookSpec],
                 dtype: torch.dtype | None = torch.float32) -> dict[str, Tensor]:
    """``harvest`` at several hooks from one forward pass, stopped once the last has fired:
    ``{name: [b·(T−1), d_in]}``."""
    return {n: _tokens_flat(a, dtype) for n, a in capture(model, tokens, [h.name for h in hooks]).items()}


def harvest_batches(model, tokens: Tensor, hook: HookSpec, batch_seqs: int = 32,
                    dtype: torch.dtype | None = torch.float32) -> Tensor:
    """``harvest`` over ``tokens [n, T]`` in chunks of ``batch_seqs`` sequences."""
    return torch.cat([harvest(model, tokens[j: j + batch_seqs], hook, dtype)
                      for j in range(0, len(tokens), batch_seqs)])


def activation_and_grad(model, tokens: Tensor, hook: HookSpec,
                        targets: Literal["tokens", "model"] = "tokens") -> tuple[Tensor, Tensor]:
    """The activation at ``hook`` and ∂L/∂activation, both ``[b, T, *shape]``.

    The hook replaces the activation by a leaf that requires grad, so the backward stops
    there; L is the next-token cross-entropy *summed* over positions, so a token's gradient
    does not shrink with the batch size (methods.md §5).

    ``targets`` says what L is scored against:
    - ``"tokens"``: the next tokens of ``tokens`` (training: the gradient of the real loss);
    - ``"model"``: the model's own greedy predictions (argmax of its clean logits). No label
      of the text enters, so a g-SAE that selects with these gradients can be evaluated on
      the text's loss without having seen it (``"tokens"`` gradients at evaluation would be
      an oracle: they are the gradient of the very loss being reported)."""
    box: list[Tensor] = []

    def leaf(act, hook=None):
        x = act.detach().requires_grad_(True)
        box.append(x)
        return x

    tokens = tokens.to(model.cfg.device)
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook.name, leaf)])
        if not box:
            raise HookError(f"hook {hook.name} did not fire during the forward pass")
        if targets == "model":  # the prediction at t stands where tokens[t + 1] would
            labels = torch.cat([tokens[:, :1], logits[:, :-1].detach().argmax(-1)], dim=1)
        elif targets == "tokens":
            labels = tokens
        else:
            raise ValueError(f"targets must be 'tokens' or 'model', not {targets!r}")
        loss = next_token_loss(logits, labels) * (tokens.shape[0] * (tokens.shape[1] - 1))
        (grad,) = torch.autograd.grad(loss, box[0])
    return box[0].detach(), grad


def harvest_with_grads(model, tokens: Tensor, hook: HookSpec, dtype: torch.dtype | None = torch.float32) -> Batch:
    """Activations ``x`` and loss gradients ``grad = ∂L/∂x`` at ``hook``, each
    ``[b·(T−1), d_in]`` (BOS dropped) in ``dtype`` (None: the model's), for g-SAE training."""
    act, grad = activation_and_grad(model, tokens, hook)
    return Batch(_tokens_flat(act, dtype), _tokens_flat(grad, dtype))


def fill_permutation(n: int, seed: int, fill: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + fill)
    return torch.randperm(n, generator=gen)


class ModelActivations:
    """Fills harvested from ``model`` at one or more hooks over batches of token sequences.

    ``token_batches`` must be deterministic; fills are requested in increasing order, and
    skipped fills only advance the token stream (no model forward). With several hooks one
    forward feeds them all (``fills_part``); ``view(name)`` is the source of one hook. Under
    data-parallel training ``fill_part`` harvests only this rank's share of the sequences.
    Fills are in the model's dtype."""

    def __init__(self, model, hook: HookSpec | list[HookSpec], token_batches: Iterator[Tensor],
                 seqs_per_fill: int, with_grads: bool = False):
        self.hooks = [hook] if isinstance(hook, HookSpec) else list(hook)
        if with_grads and len(self.hooks) > 1:
            raise ConfigError("gradients (--sparsity gtopk) are harvested for one hook at a time; "
                              "train each hook in its own run")
        self.model, self.hook, self.seqs_per_fill = model, self.hooks[0], seqs_per_fill
        self.with_grads = with_grads
        self._tokens = token_batches
        self._pending: list[Tensor] = []
        self._next_fill = 0
        self._last: tuple[tuple, dict[str, Tensor]] | None = None  # (key, fills) shared by views

    def _take_sequences(self, n: int) -> Tensor:
        while sum(len(b) for b in self._pending) < n:
            try:
                self._pending.append(next(self._tokens))
            except StopIteration:
                raise ConfigError("the token source ran out before --total-tokens; lower it "
                                  "or use a larger dataset") from None
        allseq = torch.cat(self._pending)
        self.seq_len = allseq.shape[1]
        self._pending = [allseq[n:]] if len(allseq) > n else []
        return allseq[:n]

    def _sequences(self, i: int) -> Tensor:
        if i < self._next_fill:
            raise ValueError(f"fill {i} requested after fill {self._next_fill - 1}; fills only go forward")
        while self._next_fill < i:  # resume: skip whole fills without running the model
            self._take_sequences(self.seqs_per_fill)
            self._next_fill += 1
        self._next_fill += 1
        return self._take_sequences(self.seqs_per_fill)  # [seqs_per_fill, T]

    def fills_part(self, i: int, rank: int = 0, world: int = 1, batch_seqs: int = 32) -> dict[str, Batch]:
        """Fill ``i`` at every hook, only the rows of sequence slice ``rank`` of ``world``
        (``torch.tensor_split`` of the fill's sequences): ``{name: Batch}``, ``x`` (and
        ``grad`` when harvesting gradients) ``[n_rows, d_in]``."""
        key = (i, rank, world)
        if self._last is None or self._last[0] != key:
            seqs = self._sequences(i).tensor_split(world)[rank]
            chunks = [seqs[j: j + batch_seqs] for j in range(0, len(seqs), batch_seqs)]
            if self.with_grads:
                acts = {self.hook.name: Batch.cat([harvest_with_grads(self.model, c, self.hook, None)
                                                   for c in chunks])}
            else:
                parts = [harvest_many(self.model, c, self.hooks, None) for c in chunks]
                acts = {h.name: Batch(torch.cat([p[h.name] for p in parts])) for h in self.hooks}
            self._last = (key, acts)
        return self._last[1]

    def fill(self, i: int, batch_seqs: int = 32) -> Batch:
        """Fill ``i`` of the first hook: ``[seqs_per_fill·(T−1), d_in]`` rows."""
        return self.fills_part(i, batch_seqs=batch_seqs)[self.hook.name]

    def fill_part(self, i: int, rank: int, world: int) -> tuple[Batch, int, int]:
        """This rank's rows of fill ``i`` (first hook), their offset in the fill, and the
        fill's length: rows follow sequences, ``T−1`` per sequence."""
        return _part_of(self, self.hook.name, i, rank, world)

    def view(self, name: str) -> "HookView":
        return HookView(self, name)


def _part_of(src: ModelActivations, name: str, i: int, rank: int, world: int) -> tuple[Batch, int, int]:
    rows = src.fills_part(i, rank, world)[name]
    per_seq = src.seq_len - 1  # BOS dropped
    sizes = [len(c) for c in torch.arange(src.seqs_per_fill).tensor_split(world)]
    return rows, sum(sizes[:rank]) * per_seq, src.seqs_per_fill * per_seq


class HookView:
    """The fills of one hook of a multi-hook ``ModelActivations`` (shares its forward)."""

    def __init__(self, src: ModelActivations, name: str):
        self.src, self.name = src, name

    def fill(self, i: int) -> Batch:
        return self.src.fills_part(i)[self.name]

    def fill_part(self, i: int, rank: int, world: int) -> tuple[Batch, int, int]:
        return _part_of(self.src, self.name, i, rank, world)


class TensorActivations:
    """Fills cut from an in-memory ``[n, d_in]`` tensor, with ``grads`` ``[n, d_in]`` (∂L/∂x)
    beside it for g-SAEs, in their own dtype."""

    def __init__(self, acts: Tensor, fill_tokens: int, grads: Tensor | None = None):
        self.acts, self.fill_tokens = Batch(acts, grads), fill_tokens

    @property
    def n_fills(self) -> int:
        return max(1, len(self.acts.x) // self.fill_tokens)

    def fill(self, i: int) -> Batch:
        j = i % self.n_fills  # epochs wrap around
        return self.acts.take(slice(j * self.fill_tokens, (j + 1) * self.fill_tokens))

    def fill_part(self, i: int, rank: int, world: int) -> tuple[Batch, int, int]:
        """Every rank reads the whole fill (no exchange needed)."""
        f = self.fill(i)
        return f, 0, len(f.x)


class CachedActivations:
    """Fills read from a ``saekit cache`` folder (one fill per shard), in the dtype the cache
    holds (``meta.json``'s ``dtype``; float32 for caches written before it was recorded)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SAEFileError(f"no activation cache at {self.folder}; create one with `saekit cache`")
        self.meta = read_json(self.folder / "meta.json")
        self.n_fills = self.meta["n_shards"]
        self.fill_tokens = self.meta["shard_tokens"]
        name = self.meta.get("dtype", "float32")
        if name not in DTYPES:
            raise SAEFileError(f"{self.folder / 'meta.json'}: unknown dtype {name!r}; a saekit cache holds "
                               f"{', '.join(DTYPES)}")
        self.dtype = DTYPES[name]

    def fill(self, i: int) -> Batch:
        """Shard ``i``: ``x`` ``[n, d_in]``, with ``grad`` when the cache has gradients."""
        if i == self.n_fills:
            warnings.warn(f"the cache {self.folder} holds {self.n_fills} fills; training goes "
                          "round it again (cache more tokens to avoid repeating data)", stacklevel=2)
        j = i % self.n_fills
        path = self.folder / shard_name(j)
        t = read_tensors(path)
        if t["acts"].dtype != self.dtype:
            raise SAEFileError(f"{path} holds {dtype_name(t['acts'].dtype)} activations but meta.json says "
                               f"{dtype_name(self.dtype)}; recreate the cache")
        return Batch(t["acts"], t.get("grads"))

    def fill_part(self, i: int, rank: int, world: int) -> tuple[Batch, int, int]:
        """Every rank reads the whole shard (no exchange needed)."""
        f = self.fill(i)
        return f, 0, len(f.x)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def write_cache(source: ModelActivations, folder, n_shards: int, meta: dict, progress=None) -> Path:
    """Write ``n_shards`` fills of ``source`` as safetensors shards (tensors ``acts`` and,
    with gradients, ``grads``, in the dtype the source gives them), then ``meta.json`` with
    that ``dtype`` (written last: a folder without it is an unfinished cache)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shard_tokens = dtype = None
    for i in range(n_shards):
        fill = source.fill(i)
        shard_tokens, dtype = len(fill.x), dtype_name(fill.x.dtype)
        tensors = {"acts": fill.x} if fill.grad is None else {"acts": fill.x, "grads": fill.grad}
        atomic_save_tensors(folder / shard_name(i), tensors)
        if progress is not None:
            progress.update(shard_tokens)
    atomic_write_text(folder / "meta.json", json.dumps(
        {**meta, "dtype": dtype, "n_shards": n_shards, "shard_tokens": shard_tokens}, indent=1))
    return folder
