"""Feature statistics of an SAE over a token stream: what ``saekit analyze`` computes and the
explorer shows.

Per latent, over ``n_tokens`` tokens of the corpus (saekit's held-out stream by default):
firing frequency, mean and max activation, an activation histogram, the top ``N_TOP``
activating contexts (at most one per sequence, so they differ) with the latent's activation
on every token of a window around the peak, logit effects (hook_z and residual-width hooks)
and, for hook_z SAEs, head attribution.

Stored beside the SAE as ``stats/features.safetensors`` (one file, written atomically: a
temporary name, then renamed; its header carries the metadata) and ``stats/features.json``
(the same metadata, for people). Sizes for d_sae = 2048 and 200k tokens: about 6 MB.

The histogram has fixed log-spaced bins (``BINS_PER_OCTAVE`` per factor of 2, from 2^LOG2_LO
to 2^LOG2_HI; values outside go to the end bins), so one pass fills it whatever each latent's
range turns out to be.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm import tqdm

from saekit import attention
from saekit.activations import harvest, resolve_hook
from saekit.attention import LogitEffects, final_norm_linear
from saekit.data import token_batches
from saekit.errors import ConfigError, SAEFileError
from saekit.files import atomic_save_tensors, atomic_write_text
from saekit.hooks import hook_z_layer
from saekit.models import model_name
from saekit.splice import check_sae_fits

N_TOP = 20
BEFORE, AFTER = 24, 7  # context window around the peak token: 24 before, 7 after
WINDOW = BEFORE + 1 + AFTER
LOG2_LO, LOG2_HI, BINS_PER_OCTAVE = -10, 10, 8
N_BINS = (LOG2_HI - LOG2_LO) * BINS_PER_OCTAVE
STATS_DIR, STATS_FILE, STATS_JSON = "stats", "features.safetensors", "features.json"
FORMAT_VERSION = 1


def fingerprint(sae) -> str:
    """A short hash of the decoder: statistics made for other weights are detected as stale."""
    return hashlib.sha1(sae.W_dec.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def hist_edges() -> Tensor:
    return torch.pow(2.0, torch.linspace(LOG2_LO, LOG2_HI, N_BINS + 1))  # [N_BINS + 1]


@dataclass
class FeatureStats:
    """Everything ``saekit analyze`` stores; tensors are indexed by latent first."""

    meta: dict
    freq: Tensor  # [d_sae] share of tokens the latent fires on
    mean_act: Tensor  # [d_sae] mean activation when firing
    max_act: Tensor  # [d_sae]
    hist: Tensor  # [d_sae, N_BINS] int32 counts; bin edges hist_edges()
    top_values: Tensor  # [d_sae, N_TOP] peak activation of each context, descending (0: no context)
    top_seq: Tensor  # [d_sae, N_TOP] int32 row of `sequences`, -1 for an empty slot
    top_pos: Tensor  # [d_sae, N_TOP] int32 peak position in that sequence
    top_acts: Tensor  # [d_sae, N_TOP, WINDOW] float16 activation on each window token
    sequences: Tensor  # [n_seq, seq_len] int32 token ids, BOS first
    extra: dict[str, Tensor]  # logit effects (boosted_ids/values, suppressed_ids/values), head_attr

    @property
    def d_sae(self) -> int:
        return len(self.freq)

    def contexts(self, latent: int) -> list["Context"]:
        """The latent's top contexts, strongest first (empty slots left out)."""
        out = []
        for j in range(N_TOP):
            s = int(self.top_seq[latent, j])
            if s < 0:
                break
            p = int(self.top_pos[latent, j])
            seq = self.sequences[s]
            lo = p - BEFORE  # window start in sequence coordinates (may be negative)
            keep = [i for i in range(WINDOW) if 0 <= lo + i < len(seq)]
            out.append(Context(seq[lo + keep[0]: lo + keep[-1] + 1].tolist(),
                               self.top_acts[latent, j, keep[0]: keep[-1] + 1].float(),
                               BEFORE - keep[0], float(self.top_values[latent, j]), seq[: p + 1].clone()))
        return out

    def peak_token_ids(self) -> Tensor:
        """``[d_sae]``: the token a latent peaks on most often among its top contexts (ties:
        the smallest id); -1 for a latent with no context."""
        seq = self.top_seq.long()
        ids = self.sequences[seq.clamp_min(0), self.top_pos.long()].long()  # [d_sae, N_TOP]
        ids = torch.where(seq >= 0, ids, ids[:, :1])  # empty slots repeat the first
        ids = torch.where(seq[:, :1] >= 0, ids, -1)
        return torch.mode(ids, dim=1).values


class Context(NamedTuple):
    tokens: list[int]  # the window's token ids
    acts: Tensor  # [len(tokens)] the latent's activation on each
    peak: int  # index of the peak token in `tokens`
    value: float  # activation at the peak
    prefix: Tensor  # [p + 1] the sequence up to and including the peak (for DFA at its last token)


# ---- the pass over the corpus -------------------------------------------------------------
class _Accumulator:
    """Running statistics; ``update`` takes one batch of dense codes ``f [b, T, d_sae]``."""

    def __init__(self, d_sae: int):
        self.count = torch.zeros(d_sae, dtype=torch.long)
        self.total = torch.zeros(d_sae, dtype=torch.float64)
        self.max = torch.zeros(d_sae)
        self.hist = torch.zeros(d_sae * N_BINS, dtype=torch.long)
        self.top_v = torch.zeros(N_TOP, d_sae)
        self.top_seq = torch.full((N_TOP, d_sae), -1, dtype=torch.long)
        self.top_pos = torch.zeros(N_TOP, d_sae, dtype=torch.long)
        self.top_win = torch.zeros(N_TOP, d_sae, WINDOW, dtype=torch.float16)

    def update(self, f: Tensor, first_seq: int) -> None:
        b, T, d_sae = f.shape
        # Counts, sums and the histogram from the firings alone: ~k per token, not d_sae.
        flat = f.view(-1, d_sae)
        rows, lat = (flat > 0).nonzero(as_tuple=True)
        vals = flat[rows, lat]
        self.count += torch.bincount(lat, minlength=d_sae)
        self.total += torch.bincount(lat, vals, minlength=d_sae).double()
        bins = ((vals.log2() - LOG2_LO) * BINS_PER_OCTAVE).floor().long().clamp(0, N_BINS - 1)
        self.hist.index_add_(0, lat * N_BINS + bins, torch.ones_like(bins))

        peak_v, peak_p = f.max(dim=1)  # [b, d_sae]: one candidate context per sequence
        self.max = torch.maximum(self.max, peak_v.amax(0))
        offs = torch.arange(-BEFORE, AFTER + 1)
        pos = (peak_p[..., None] + offs).clamp(0, T - 1)  # [b, d_sae, WINDOW]
        inside = ((peak_p[..., None] + offs) >= 0) & ((peak_p[..., None] + offs) < T)
        win = f.gather(1, pos.permute(0, 2, 1)).permute(0, 2, 1) * inside  # [b, d_sae, WINDOW]

        all_v = torch.cat([self.top_v, peak_v])  # [N_TOP + b, d_sae]
        seqs = torch.cat([self.top_seq, (first_seq + torch.arange(b))[:, None].expand(b, d_sae)])
        poss = torch.cat([self.top_pos, peak_p])
        wins = torch.cat([self.top_win, win.half()])
        self.top_v, sel = all_v.topk(N_TOP, dim=0)  # [N_TOP, d_sae]
        self.top_seq, self.top_pos = seqs.gather(0, sel), poss.gather(0, sel)
        self.top_win = wins.gather(0, sel[..., None].expand(-1, -1, WINDOW))
        self.top_seq[self.top_v <= 0] = -1


def _extra(model, sae) -> dict[str, Tensor]:
    """Logit effects and head attribution, where the hook allows them."""
    if hook_z_layer(sae.cfg.hook_name) is not None:
        eff = attention.logit_effects(model, sae, top=10)
        out = {"head_attr": attention.head_attribution(sae, model)}
    elif sae.cfg.d_in == model.cfg.d_model and ("resid" in sae.cfg.hook_name or sae.cfg.hook_name.endswith(
            ("hook_attn_out", "hook_mlp_out"))):  # writes straight into the residual stream
        eff = residual_logit_effects(model, sae)
        out = {}
    else:
        return {}
    return {**out, "boosted_ids": eff.boosted_ids.int(), "boosted_values": eff.boosted_values,
            "suppressed_ids": eff.suppressed_ids.int(), "suppressed_values": eff.suppressed_values}


@torch.no_grad()
def residual_logit_effects(model, sae, top: int = 10, chunk: int = 1024):
    """Direct logit effects of latents of an SAE that writes to the residual stream:
    ``norm(W_dec[i]) @ W_U`` (the final norm's linear part, as ``saekit.attention``)."""
    W_U = model.W_U.float()
    parts = []
    for s in range(0, sae.cfg.d_sae, chunk):
        eff = final_norm_linear(model, sae.W_dec[s: s + chunk].float().to(W_U.device)) @ W_U
        k = min(top, eff.shape[1])
        up, down = eff.topk(k, dim=1), eff.topk(k, dim=1, largest=False)
        parts.append(tuple(t.cpu() for t in (up.indices, up.values, down.indices, down.values)))
    return LogitEffects(*(torch.cat(p) for p in zip(*parts)))


@torch.no_grad()
def analyze(model, sae, n_tokens: int = 200_000, seq_len: int = 128, batch_seqs: int = 32,
            dataset: str | None = None, progress: bool = True) -> FeatureStats:
    """One pass over ``n_tokens`` tokens of ``dataset`` (saekit's held-out corpus when None).
    BOS positions are never counted (the SAE never saw them in training)."""
    sae.cfg = check_sae_fits(model, sae)
    if n_tokens < 1:
        raise ConfigError(f"--tokens must be positive, not {n_tokens}")
    seq_len = min(seq_len, model.cfg.n_ctx)
    if seq_len < 2:
        raise ConfigError("--seq-len must be at least 2 (BOS plus one token)")
    hook = resolve_hook(model, sae.cfg.hook_name)
    stream = token_batches(model.tokenizer, dataset, seq_len, batch_seqs, seed=0, split="heldout")
    acc = _Accumulator(sae.cfg.d_sae)
    seqs: list[Tensor] = []
    done, start = 0, time.time()
    was = sae.training
    sae.eval()  # inference rule of batch-level sparsifiers; no threshold updates
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="analyze", disable=not progress)
    try:
        while done < n_tokens:
            tokens = next(stream, None)
            if tokens is None:
                raise ConfigError(f"the token source ran out after {done} tokens; lower --tokens")
            tokens = tokens[: -(-(n_tokens - done) // (seq_len - 1))]  # no more sequences than needed
            f = _codes(model, sae, tokens, hook)  # [b, T, d_sae], 0 at BOS
            acc.update(f, len(seqs))
            seqs.extend(tokens.int())
            n = tokens.shape[0] * (tokens.shape[1] - 1)
            done += n
            bar.update(n)
    finally:
        bar.close()
        sae.train(was)
    return _finish(acc, torch.stack(seqs), model, sae, done, seq_len, dataset, time.time() - start)


def _codes(model, sae, tokens: Tensor, hook) -> Tensor:
    b, T = tokens.shape
    x = harvest(model, tokens, hook)  # [b·(T−1), d_in]
    f = sae.encode_dense(x.to(sae.W_dec.device)).float().cpu()  # [b·(T−1), d_sae]
    return torch.cat([f.new_zeros(b, 1, f.shape[1]), f.view(b, T - 1, -1)], dim=1)  # [b, T, d_sae]


def _finish(acc: _Accumulator, sequences: Tensor, model, sae, n_tokens, seq_len, dataset, seconds):
    used = acc.top_seq[acc.top_seq >= 0].unique()  # keep only sequences some context uses
    remap = torch.full((len(sequences),), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    top_seq = torch.where(acc.top_seq >= 0, remap[acc.top_seq.clamp_min(0)], -1)
    meta = {"format_version": FORMAT_VERSION, "n_tokens": n_tokens, "seq_len": seq_len,
            "dataset": dataset or "saekit", "hook_name": sae.cfg.hook_name, "d_sae": sae.cfg.d_sae,
            "model_name": model_name(model, sae.cfg.model_name), "sae_fingerprint": fingerprint(sae),
            "n_top": N_TOP, "window": [BEFORE, AFTER], "seconds": round(seconds, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return FeatureStats(meta, acc.count.float() / n_tokens, (acc.total / acc.count.clamp_min(1)).float(), acc.max,
                        acc.hist.view(-1, N_BINS).int(), acc.top_v.T.contiguous(), top_seq.T.int().contiguous(),
                        acc.top_pos.T.int().contiguous(), acc.top_win.permute(1, 0, 2).contiguous(),
                        sequences[used].contiguous(), _extra(model, sae))


# ---- files --------------------------------------------------------------------------------
_FIELDS = ("freq", "mean_act", "max_act", "hist", "top_values", "top_seq", "top_pos", "top_acts", "sequences")


def stats_path(sae_folder) -> Path:
    return Path(sae_folder) / STATS_DIR / STATS_FILE


def save_stats(stats: FeatureStats, sae_folder) -> Path:
    """Write ``stats`` beside the SAE in ``sae_folder`` (atomically; the json last)."""
    tensors = {name: getattr(stats, name) for name in _FIELDS} | stats.extra
    path = stats_path(sae_folder)
    atomic_save_tensors(path, tensors, metadata={"saekit_stats": json.dumps(stats.meta)})
    summary = {**stats.meta, "alive": int((stats.freq > 0).sum()), "mean_freq": stats.freq.mean().item()}
    atomic_write_text(path.parent / STATS_JSON, json.dumps(summary, indent=1))
    return path


def load_stats(sae_folder, sae=None, sae_path: str | None = None) -> FeatureStats:
    """Read the statistics beside ``sae_folder``. With ``sae``, raise ``SAEFileError`` when
    they were made for other weights. Messages name the command that fixes the problem (with
    ``sae_path``, the SAE as the user named it, e.g. an hf:// path, when it is not the folder)."""
    path = stats_path(sae_folder)
    fix = f"run `saekit analyze --sae {sae_path or sae_folder}`"
    if not path.is_file():
        raise SAEFileError(f"no feature statistics at {path}; {fix}")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {})["saekit_stats"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise SAEFileError(f"{path} is unreadable ({type(e).__name__}); {fix}") from None
    if meta.get("format_version") != FORMAT_VERSION or any(k not in tensors for k in _FIELDS):
        raise SAEFileError(f"{path} was written by another saekit version; {fix}")
    if sae is not None and meta.get("sae_fingerprint") != fingerprint(sae):
        raise SAEFileError(f"the statistics in {path} were computed for other SAE weights; {fix}")
    extra = {k: v for k, v in tensors.items() if k not in _FIELDS}
    return FeatureStats(meta, *(tensors[k] for k in _FIELDS), extra)


# ---- one prompt ---------------------------------------------------------------------------
class Lens(NamedTuple):
    tokens: list[str]  # every token of the prompt, BOS first
    acts: Tensor  # [T, d_sae] dense feature activations (row 0, BOS, is all zeros)
    token_ids: Tensor  # [T]


@torch.no_grad()
def prompt_lens(model, sae, prompt: str) -> Lens:
    """The SAE's feature activations on every token of ``prompt``."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the prompt is empty; type some text to read through the SAE")
    sae.cfg = check_sae_fits(model, sae)
    tokens = model.to_tokens(prompt)[:, : model.cfg.n_ctx]  # [1, T]
    was = sae.training
    sae.eval()
    try:
        f = _codes(model, sae, tokens.cpu(), resolve_hook(model, sae.cfg.hook_name))[0]
    finally:
        sae.train(was)
    ids = tokens[0].cpu()
    return Lens(model.tokenizer.batch_decode([[t] for t in ids.tolist()]), f, ids)
