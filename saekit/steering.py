"""Steering: edit the activation at an SAE's hook point while the model runs.

Each intervention is bound to one SAE and edits the activation ``x`` (flattened per token to
``d_in``; for ``hook_z`` the heads are concatenated, ``SAE.flatten_hook``) at chosen positions:

    Add(sae, i, coef)       x ← x + coef·W_dec[i]
    Clamp(sae, i, value)    x ← x + (value − f_i(x))·W_dec[i]
    Ablate(sae, [i, ..])    x ← x − Σ f_i(x)·W_dec[i]
    Cap(sae, i, value)      x ← x − max(x·u − value, 0)·u,   u = W_dec[i] / ‖W_dec[i]‖
    Reconstruct(sae)        x ← decode(encode(x))             (what ``run_on_reconstruction`` runs)

Clamp and Ablate re-encode ``x`` with the SAE's own ``encode`` (so every sparsifier works),
set the latents, decode, and keep the SAE's error term ``x − decode(f)``:
``decode(f') + (x − decode(f)) = x + (f' − f)·W_dec``, so nothing but the chosen latents
changes. Batch-level sparsifiers (mutual/feature choice) encode with their inference rule
(``sae.eval()``; the SAE is switched to eval mode for the call and back), and the rows at the
chosen positions of the batch form the batch.

Positions: ``"all"`` (every position after BOS: the SAE never saw position 0 in training and
``saekit.splice`` leaves it too), ``"last"``, or a list of indices (negative ones count from
the end; indices past the current length are skipped, so they apply once generation reaches
them). Several interventions on one hook apply in list order, each seeing the previous edit.

Use them as a context manager, ``with steer(model, [Add(sae, 7, 8.0)]): model(tokens)``, or
as hook lists, ``model.run_with_hooks(tokens, fwd_hooks=hooks(model, interventions))``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from saekit.corpus import NAMES
from saekit.errors import ConfigError
from saekit.ioi import logit_diff, single_token_id
from saekit.splice import check_sae_fits

Positions = Union[Literal["all", "last"], Sequence[int]]


def _check_positions(positions: Positions) -> Positions:
    if isinstance(positions, str):
        if positions not in ("all", "last"):
            raise ConfigError(f"positions must be 'all', 'last' or a list of indices, not {positions!r}")
        return positions
    try:
        return tuple(int(p) for p in positions)
    except (TypeError, ValueError):
        raise ConfigError(f"positions must be 'all', 'last' or a list of indices, not {positions!r}") from None


def _check_latent(sae, latent: int) -> int:
    if not 0 <= int(latent) < sae.cfg.d_sae:
        raise ConfigError(f"latent {latent} is out of range: this SAE has {sae.cfg.d_sae} latents "
                          f"(0 to {sae.cfg.d_sae - 1})")
    return int(latent)


def position_index(positions: Positions, T: int) -> list[int]:
    """The positions of a length-``T`` sequence that ``positions`` selects."""
    if positions == "all":
        return list(range(1, T))
    if positions == "last":
        return [T - 1] if T > 1 else []
    return sorted({p % T for p in positions if -T <= p < T})


@contextlib.contextmanager
def _eval_mode(sae):
    """Inference rule of the sparsifier (thresholds, not batch selection), and no EMA updates."""
    was = sae.training
    sae.eval()
    try:
        yield
    finally:
        sae.train(was)


@dataclass(eq=False)
class Intervention:
    """Base class: edits rows ``x [n, d_in]`` at the SAE's hook, at ``positions``."""

    sae: object
    positions: Positions = field(default="all", kw_only=True)

    def __post_init__(self):
        self.positions = _check_positions(self.positions)

    @property
    def hook_name(self) -> str:
        return self.sae.cfg.hook_name

    def edit(self, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_in"]:
        raise NotImplementedError

    def hook_fn(self, act: Tensor, hook=None) -> Tensor:
        """A TransformerLens hook function: ``act [b, T, *hook_shape]`` edited at the positions."""
        idx = position_index(self.positions, act.shape[1])
        if not idx:
            return act
        sae = self.sae
        x = sae.flatten_hook(act[:, idx])  # [b, n_pos, d_in]
        with torch.no_grad(), _eval_mode(sae):
            rows = x.reshape(-1, sae.cfg.d_in).to(sae.W_dec.dtype)
            new = self.edit(rows).reshape(x.shape)
        out = act.clone()
        out[:, idx] = sae.unflatten_hook(new).to(act.dtype)
        return out


def _set_latents(sae, x: Tensor, set_fn: Callable[[Tensor], None]) -> Tensor:
    """Re-encode, let ``set_fn`` edit the dense code in place, decode, keep the error term."""
    f = sae.encode_dense(x)  # [n, d_sae]
    f_new = f.clone()
    set_fn(f_new)
    return x + (f_new - f) @ sae.W_dec  # = decode(f_new) + (x − decode(f))


@dataclass(eq=False)
class _OnLatent(Intervention):
    """An intervention on one latent, checked to be in range."""

    latent: int

    def __post_init__(self):
        super().__post_init__()
        self.latent = _check_latent(self.sae, self.latent)


@dataclass(eq=False)
class Add(_OnLatent):
    """Add ``coef`` times latent ``latent``'s decoder direction."""

    coef: float

    def edit(self, x):
        return x + self.coef * self.sae.W_dec[self.latent]


@dataclass(eq=False)
class Clamp(_OnLatent):
    """Set latent ``latent`` to ``value`` (re-encode, set, decode, keep the error term)."""

    value: float

    def edit(self, x):
        return _set_latents(self.sae, x, lambda f: f[:, self.latent].fill_(self.value))


@dataclass(eq=False)
class Ablate(Intervention):
    """Set each latent in ``latents`` to 0 (re-encode, zero, decode, keep the error term)."""

    latents: Sequence[int]

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.latents, int):
            self.latents = (self.latents,)
        self.latents = tuple(_check_latent(self.sae, i) for i in self.latents)

    def edit(self, x):
        idx = torch.tensor(self.latents, dtype=torch.long, device=x.device)
        return _set_latents(self.sae, x, lambda f: f.index_fill_(1, idx, 0.0))


@dataclass(eq=False)
class Cap(_OnLatent):
    """Cap the projection of ``x`` on latent ``latent``'s unit decoder direction at ``value``.
    No encoding: it bounds how far the activation points along that direction, whatever
    the sparsifier selects."""

    value: float

    def edit(self, x):
        d = self.sae.W_dec[self.latent]
        u = d / d.norm().clamp_min(1e-12)
        excess = (x @ u - self.value).clamp_min(0)  # [n]
        return x - excess[:, None] * u


@dataclass(eq=False)
class Reconstruct(Intervention):
    """Replace the activation by the SAE's reconstruction."""

    def edit(self, x):
        return self.sae(x).x_hat


METHODS: dict[str, type[Intervention]] = {"add": Add, "clamp": Clamp, "ablate": Ablate, "cap": Cap}


def make(method: str, sae, latent: int, value: float = 0.0, positions: Positions = "all") -> Intervention:
    """One intervention by name (the app's form): ``value`` is the coefficient for add, the
    value for clamp and cap, and unused for ablate."""
    if method not in METHODS:
        raise ConfigError(f"unknown steering method {method!r}; choose from {sorted(METHODS)}")
    if method == "add":
        return Add(sae, latent=latent, coef=value, positions=positions)
    if method == "ablate":
        return Ablate(sae, latents=(latent,), positions=positions)
    return METHODS[method](sae, latent=latent, value=value, positions=positions)


# ---- applying them ------------------------------------------------------------------------
def hooks(model, interventions: Sequence[Intervention]) -> list[tuple[str, Callable]]:
    """``fwd_hooks`` for ``run_with_hooks`` / ``model.hooks``; checks every SAE fits ``model``."""
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise ConfigError(f"expected steering interventions (Add, Clamp, ...), got {type(iv).__name__}")
        iv.sae.cfg = check_sae_fits(model, iv.sae)
    return [(iv.hook_name, iv.hook_fn) for iv in interventions]


def steer(model, interventions: Sequence[Intervention]):
    """Context manager: ``model`` runs with ``interventions`` inside the ``with`` block."""
    return model.hooks(fwd_hooks=hooks(model, interventions))


def run_on_reconstruction(model, sae, positions: Positions = "all"):
    """Context manager: ``model`` runs on ``sae``'s reconstruction at its hook (the
    ``Reconstruct`` intervention; ``saekit.splice`` is the evaluation's version)."""
    return steer(model, [Reconstruct(sae, positions=positions)])


# ---- generation ---------------------------------------------------------------------------
class Generation(NamedTuple):
    prompt: str
    steered: str
    """Continuation (text after the prompt) with the interventions."""
    unsteered: str
    """Continuation without them."""


def _tokens(model, prompt: str) -> Tensor:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the prompt is empty; type some text to continue")
    tokens = model.to_tokens(prompt)  # [1, T], BOS first
    if tokens.shape[1] >= model.cfg.n_ctx:
        raise ConfigError(f"the prompt has {tokens.shape[1]} tokens; this model's context is {model.cfg.n_ctx}")
    return tokens


@torch.no_grad()
def _continue(model, tokens: Tensor, max_new_tokens: int, temperature: float, seed: int) -> Tensor:
    """New token ids after ``tokens [1, T]``. No KV cache: every step reruns the whole
    sequence, so ``positions`` mean the same thing at every step (the hooks see ``[1, T']``)."""
    gen = torch.Generator(device=tokens.device).manual_seed(seed)
    eos = model.tokenizer.eos_token_id
    limit = min(max_new_tokens, model.cfg.n_ctx - tokens.shape[1])
    for _ in range(limit):
        logits = model(tokens)[0, -1].float()  # [d_vocab]
        if temperature <= 0:
            nxt = logits.argmax()
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)[0]
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
        if eos is not None and int(nxt) == eos:
            break
    return tokens[0]


def generate(model, prompt: str, interventions: Sequence[Intervention], max_new_tokens: int = 20,
             temperature: float = 0.0, seed: int = 0) -> Generation:
    """Continue ``prompt`` with and without ``interventions``. ``temperature=0`` is greedy;
    otherwise both runs sample with the same seed, so they differ only through the steering."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    tokens = _tokens(model, prompt)
    fwd = hooks(model, interventions)
    T = tokens.shape[1]
    plain = _continue(model, tokens, max_new_tokens, temperature, seed)
    with model.hooks(fwd_hooks=fwd):
        steered = _continue(model, tokens, max_new_tokens, temperature, seed)
    text = lambda t: model.tokenizer.decode(t[T:].tolist())  # noqa: E731
    return Generation(prompt, text(steered), text(plain))


# ---- IOI ----------------------------------------------------------------------------------
class IOILogitDiff(NamedTuple):
    io: str
    s: str
    before: float
    """logit(IO) − logit(S) at the last position, unsteered."""
    after: float
    """The same with the interventions."""


def ioi_names(text: str) -> tuple[str, str] | None:
    """``(io, s)`` if ``text`` reads as an IOI prompt: exactly two of saekit's names, one
    said once (the indirect object) and one twice (the subject); else ``None``."""
    known = set(NAMES)
    counts: dict[str, int] = {}
    for w in re.findall(r"[A-Z][a-z]+", text):
        if w in known:
            counts[w] = counts.get(w, 0) + 1
    if len(counts) != 2 or sorted(counts.values()) != [1, 2]:
        return None
    io, s = sorted(counts, key=counts.get)
    return io, s


@torch.no_grad()
def ioi_logit_diff(model, prompt: str, interventions: Sequence[Intervention]) -> IOILogitDiff | None:
    """IOI logit difference before and after steering, or ``None`` when ``prompt`` is not an
    IOI prompt (see ``ioi_names``) or a name is not one token for this tokenizer."""
    names = ioi_names(prompt)
    if names is None:
        return None
    ids = [single_token_id(model.tokenizer, n) for n in names]
    if None in ids:
        return None
    tokens = _tokens(model, prompt)

    def diff() -> float:
        last = model(tokens)[:, -1]  # [1, vocab]
        return logit_diff(last, torch.tensor(ids[:1]), torch.tensor(ids[1:])).item()

    before = diff()
    with steer(model, interventions):
        after = diff()
    return IOILogitDiff(names[0], names[1], before, after)
