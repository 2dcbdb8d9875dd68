"""IOI prompts for scoring SAEs against supervised dictionaries (methods.md §7).

Two prompt sets are drawn per evaluation:
- the *fit* set, with every name, fits the supervised dictionaries and the latents'
  interpretations (F1 against each attribute value);
- the *eval* set uses only the first half of the names for IO and S, and each of its prompts
  has one counterfactual per attribute (``io``, ``s``, ``pos``) whose new names come from the
  second half, so counterfactual names never occur as evaluation names.
For the embedded model the templates and name pairs are the held-out ones it never trained
on; for any other model, the paper's style of templates and the names that are single tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from saekit import corpus
from saekit.corpus import IOIPrompt
from saekit.ioi import encode_prompts, single_token_id
from saekit.models import EMBEDDED_NAME, model_name

ATTRIBUTES = ("io", "s", "pos")
ORDERS = ("ABB", "BAB")


@dataclass
class IOIData:
    """Encoded prompts with the positions and attribute labels the evaluation needs."""

    prompts: list[IOIPrompt]
    tokens: Tensor  # [n, T] right-padded, BOS first
    end: Tensor  # [n] last prompt position (END)
    s2: Tensor  # [n] position of the repeated subject (S2)
    io_tok: Tensor  # [n]
    s_tok: Tensor  # [n]
    labels: dict[str, Tensor]  # attr -> [n] index into IOISetup.values[attr]

    def __len__(self) -> int:
        return len(self.prompts)

    def position(self, pos: str) -> Tensor:
        return self.end if pos == "end" else self.s2


@dataclass
class IOISetup:
    """Which templates and names a model is evaluated with."""

    templates: tuple[str, ...]
    names: tuple[str, ...]  # single-token names; the first half are evaluation names
    heldout_pairs: bool  # embedded model: only name pairs it never trained on

    @property
    def values(self) -> dict[str, list[str]]:
        return {"io": list(self.names), "s": list(self.names), "pos": list(ORDERS)}

    @property
    def eval_names(self) -> tuple[str, ...]:
        return self.names[: len(self.names) // 2]

    @property
    def cf_names(self) -> tuple[str, ...]:
        return self.names[len(self.names) // 2:]


def setup_for(model) -> IOISetup:
    names = tuple(n for n in corpus.NAMES if single_token_id(model.tokenizer, n) is not None)
    if len(names) < 8:
        raise ValueError("fewer than 8 IOI names are single tokens for this tokenizer")
    if model_name(model) == EMBEDDED_NAME:
        return IOISetup(corpus.HELDOUT_TEMPLATES, names, heldout_pairs=True)
    return IOISetup(corpus.PAPER_TEMPLATES, names, heldout_pairs=False)


def _draw(rng: random.Random, setup: IOISetup, names: tuple[str, ...], pairs_heldout: bool) -> IOIPrompt:
    while True:
        io, s = rng.sample(names, 2)
        if not pairs_heldout or corpus.pair_is_heldout(io, s):
            break
    t, order = rng.randrange(len(setup.templates)), rng.choice(ORDERS)
    place, obj = rng.choice(corpus.PLACES), rng.choice(corpus.OBJECTS)
    return IOIPrompt(corpus.render(setup.templates[t], io, s, order, place, obj), io, s, order, t, place, obj)


def fit_prompts(setup: IOISetup, n: int, seed: int = 0) -> list[IOIPrompt]:
    """Prompts with every name, for fitting dictionaries and interpreting latents."""
    rng = random.Random(f"ioi-fit-{seed}")
    return [_draw(rng, setup, setup.names, False) for _ in range(n)]


def eval_prompts(setup: IOISetup, n: int, seed: int = 0) -> list[IOIPrompt]:
    """Prompts whose IO and S come from the first half of the names."""
    rng = random.Random(f"ioi-eval-{seed}")
    return [_draw(rng, setup, setup.eval_names, setup.heldout_pairs) for _ in range(n)]


def counterfactual(p: IOIPrompt, attr: str, setup: IOISetup, rng: random.Random) -> IOIPrompt:
    """``p`` with one attribute changed: a new IO or S name from the counterfactual half of
    the names, or the other order (pos). Template, place and object stay, so every token
    position is unchanged (names are single tokens)."""
    io, s, order = p.io, p.s, p.order
    if attr == "io":
        io = rng.choice([n for n in setup.cf_names if n != s])
    elif attr == "s":
        s = rng.choice([n for n in setup.cf_names if n != io])
    elif attr == "pos":
        order = ORDERS[1 - ORDERS.index(order)]
    else:
        raise ValueError(f"unknown attribute {attr!r}; expected one of {ATTRIBUTES}")
    text = corpus.render(setup.templates[p.template], io, s, order, p.place, p.object)
    return replace(p, text=text, io=io, s=s, order=order)


def counterfactuals(prompts: list[IOIPrompt], attr: str, setup: IOISetup, seed: int = 0) -> list[IOIPrompt]:
    rng = random.Random(f"ioi-cf-{attr}-{seed}")
    return [counterfactual(p, attr, setup, rng) for p in prompts]


def encode(tokenizer, prompts: list[IOIPrompt], setup: IOISetup) -> IOIData:
    tokens, end, io_tok, s_tok = encode_prompts(tokenizer, prompts)
    # S2 is the last occurrence of the subject's token before END.
    hits = (tokens == s_tok[:, None]) & (torch.arange(tokens.shape[1]) <= end[:, None])
    s2 = (hits * torch.arange(tokens.shape[1])).argmax(1)
    index = {n: i for i, n in enumerate(setup.names)}
    labels = {"io": torch.tensor([index[p.io] for p in prompts]),
              "s": torch.tensor([index[p.s] for p in prompts]),
              "pos": torch.tensor([p.pos for p in prompts])}
    return IOIData(prompts, tokens, end, s2, io_tok, s_tok, labels)
