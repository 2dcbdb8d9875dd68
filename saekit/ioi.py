"""Score a model on indirect object identification (IOI).

Accuracy is the share of prompts with logit(IO) > logit(S) at the last position; the logit
difference is ``logit(IO) − logit(S)`` averaged over prompts (methods.md §7).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from saekit.corpus import IOIPrompt, ioi_prompts


class IOIScore(NamedTuple):
    accuracy: float
    logit_diff: float
    n: int


def single_token_id(tokenizer, word: str) -> int | None:
    """The id of ``" " + word`` if it is one token, else ``None``."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def encode_prompts(tokenizer, prompts: Sequence[IOIPrompt]):
    """Right-padded token ids ``[n, T]`` (BOS first), the last prompt position of each row,
    and the IO and S answer token ids. Every IO/S name must be a single token."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = [[bos] + tokenizer.encode(p.text, add_special_tokens=False) for p in prompts]
    T = max(map(len, rows))
    tokens = torch.full((len(rows), T), bos, dtype=torch.long)  # [n, T]
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    last = torch.tensor([len(r) - 1 for r in rows])
    io = torch.tensor([single_token_id(tokenizer, p.io) for p in prompts])
    s = torch.tensor([single_token_id(tokenizer, p.s) for p in prompts])
    return tokens, last, io, s


def prompts_for(tokenizer, n: int, split: str = "heldout", seed: int = 0) -> list[IOIPrompt]:
    """``n`` prompts of saekit's templates whose names are single tokens for ``tokenizer``
    (all of them for the embedded model; a subset for, e.g., GPT-2)."""
    out: list[IOIPrompt] = []
    batch = 0
    while len(out) < n:
        for p in ioi_prompts(4 * n, split, seed=seed * 1000 + batch):
            if single_token_id(tokenizer, p.io) is not None and single_token_id(tokenizer, p.s) is not None:
                out.append(p)
        batch += 1
        if batch > 20 and not out:
            raise ValueError("this tokenizer splits every IOI name into several tokens")
    return out[:n]


def logit_diff(logits: Tensor, io: Tensor, s: Tensor) -> Tensor:
    """``logit(IO) − logit(S)`` per row of ``logits [n, vocab]`` (each row's answer
    position), ``io`` and ``s`` the answer token ids ``[n]``: ``[n]``, in the logits' dtype
    and device. Every IOI logit difference in saekit is this one."""
    rows = torch.arange(len(logits), device=logits.device)
    return logits[rows, io.to(logits.device)] - logits[rows, s.to(logits.device)]


@torch.no_grad()
def logit_diffs(model, prompts: Sequence[IOIPrompt], batch_size: int = 250) -> torch.Tensor:
    """``logit(IO) − logit(S)`` per prompt, ``[n]``."""
    out = []
    for i in range(0, len(prompts), batch_size):
        tokens, last, io, s = encode_prompts(model.tokenizer, prompts[i : i + batch_size])
        logits = model(tokens.to(model.cfg.device))[torch.arange(len(tokens)), last]  # [b, vocab]
        out.append(logit_diff(logits, io, s).float().cpu())
    return torch.cat(out)


def score_ioi(model, n: int = 1000, split: str = "heldout", seed: int = 0) -> IOIScore:
    """IOI accuracy and mean logit difference of ``model`` on ``n`` prompts."""
    ld = logit_diffs(model, prompts_for(model.tokenizer, n, split, seed))
    return IOIScore((ld > 0).float().mean().item(), ld.mean().item(), len(ld))
