"""`saekit bench papers`: the seed papers' claims, tested on the embedded model.

Each experiment trains the SAEs it needs from one activation cache per hook (``saekit
cache``; with gradients at the attention hook, for g-SAEs), scores them with saekit's own
measures (``saekit.training.summary``: explained variance, CE loss recovered against **mean**
ablation, KL; ``saekit.metrics.ReconstructionStream``: firing frequencies), and states a
verdict that is computed from the numbers by a rule written beside it:

- ``frontier`` — sparsity against fidelity for every architecture at mean L0 near 8, 16, 32
  and 64 (the selection rules take k; the elementwise ones a grid of penalty weights, and
  their *achieved* L0 is what is plotted). Claims: TopK beats ReLU + L1 at equal L0 (Gao et
  al. 2024, "Scaling and evaluating sparse autoencoders", §2.3 and Fig. 2); JumpReLU and Gated
  beat ReLU + L1 at equal L0 (Rajamanoharan et al. 2024, JumpReLU paper §5 Fig. 2; Gated paper
  §5.1); BatchTopK beats TopK at equal L0 (Bussmann et al. 2024, §4.1).
- ``dead`` — dead and under-used latents at 16× and 32× expansion (64× with a budget of one's
  own: from the 16× and 32× runs' times, it alone would take roughly half an hour on 2 CPU
  cores): TopK without and with AuxK, and Mutual Choice and Feature Choice with aux_zipf (the
  paper's recipe); TopK with aux_zipf with a budget of one's own. AuxK and aux_zipf count a
  latent dead after ``dead_tokens`` without firing, a quarter of a run (saekit's default, 1M
  tokens, is longer than the run, and AuxK would never switch on). Claim (Ayonrinde 2024,
  "Adaptive sparse allocation with Mutual Choice & Feature Choice SAEs", §5): MC and FC leave
  fewer dead latents and reconstruct better at equal sparsity than TopK.
- ``gsae`` — g-SAE (Olmo et al. 2024, "Features that make a difference", §4): downstream CE
  recovered and KL at equal k against TopK for several β, scored *without* labels (the
  selection falls back to TopK's rule, the fair comparison) and, reported apart, selecting
  with gradients of the loss against the model's own predictions, scored where no gradient
  read the label (``saekit.splice.with_model_gradients``); and steering effect — the mean KL
  of the next-token distribution after adding a latent's decoder direction, at one norm for
  both SAEs, over random held-out contexts. Claim: g-SAE latents reconstruct what matters
  downstream better and steer more.
- ``ioi`` — every architecture against supervised IOI dictionaries on Makelov, Lange &
  Nanda's three axes, trained on the corpus and on IOI prompts, over a sweep of d_sae
  (``evals/papers_ioi.py``, whose docstring states its claims and rules).
- ``attn`` — attention-output SAEs at every layer's ``blocks.L.attn.hook_z`` (Kissane et al.
  2024, "Interpreting Attention Layer Outputs with Sparse Autoencoders"; evals/papers_attn.py,
  whose docstring has its rules): CE loss recovered at L0 < 20, polysemantic heads (by an
  automatic proxy for the paper's manual labels) and induction features whose head attends to
  the token after the first occurrence.

Deciding rules. A difference between two configurations is *told* only when their seeds do
not overlap (every seed of one beats every seed of the other, at least ``min_seeds`` each),
or, for single-seed frontier points, when it exceeds the spread (max − min) of TopK's seeds
at the middle L0 (32) on the same hook. A claim *holds* when every told comparison goes its way and at
least one is told, *does not hold* when one is told against it, and otherwise *cannot be told
at this scale*.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from saekit.errors import ConfigError
from saekit.evals.papers_attn import exp_attn
from saekit.evals.papers_common import ATTN_HOOK, PENALTY_GRID, RESID_HOOK, separated, verdict
from saekit.evals.papers_ioi import exp_ioi
from saekit.files import atomic_write_text

SELECTIONS = ("topk", "gtopk", "batchtopk", "feature_choice", "matryoshka")
DEAD_VARIANTS = {"topk": ("topk", "none"), "topk+auxk": ("topk", "auxk"), "topk+zipf": ("topk", "zipf"),
                 "mutual_choice+zipf": ("mutual_choice", "zipf"), "feature_choice+zipf": ("feature_choice", "zipf")}
EXPERIMENTS = ("frontier", "dead", "gsae", "ioi", "attn")


@dataclass(frozen=True)
class Budget:
    """How much each experiment trains and evaluates."""

    tokens: int  # training activations per SAE
    eval_tokens: int  # held-out tokens per summary and per firing count
    expansion: int  # the frontier's width, × d_in
    l0s: tuple[int, ...] = (8, 16, 32, 64)
    hooks: tuple[str, ...] = (ATTN_HOOK, RESID_HOOK)  # the frontier's
    selections: tuple[str, ...] = SELECTIONS  # the frontier's architectures
    elementwise: tuple[str, ...] = tuple(PENALTY_GRID)
    penalties: tuple[int, ...] = (0, 1, 2, 3)  # which of each PENALTY_GRID's weights
    dead_variants: tuple[str, ...] = tuple(DEAD_VARIANTS)
    expansions: tuple[int, ...] = (16, 32, 64)  # dead latents' widths, × d_in
    dead_k: int = 16
    dead_tokens: int = 131_072  # AuxK's and aux_zipf's dead window there (the default 1M outlasts a run)
    betas: tuple[float, ...] = (0.5, 1.0, 2.0)
    gsae_k: int = 16
    steer_latents: int = 32
    steer_seqs: int = 8
    seeds: int = 3
    min_seeds: int = 3
    batch_size: int = 4096
    fill_tokens: int = 131_072  # activations per cache shard
    ioi_sizes: tuple[int, ...] = (256, 1024, 4096)  # the IOI experiment's d_sae sweep (TopK)
    ioi_k: int = 32  # the IOI experiment's k (and the L0 its elementwise SAEs are picked near)
    ioi_n: int = 1000  # IOI evaluation prompts (twice as many fit the dictionaries)
    attn_k: int = 16  # the attention-output SAEs' k: L0 < 20, as Kissane et al.'s
    attn_layers: tuple[int, ...] = ()  # their layers; () = every layer
    warmup_frac: float = 0.1  # the learning rate's warm-up, a share of each run's steps
    revision: int = 3  # raised when saekit's training changes results, so older runs are not reused

    def warmup_steps(self) -> int:
        """Warm-up steps of one run: ``warmup_frac`` of its steps, at least 1. saekit's default of
        100 steps suits its 4M-token default job (about 1,000 steps); at the suite's 124 steps it
        would hold the rate below its peak for most of the run."""
        return max(1, round(self.warmup_frac * self.tokens / self.batch_size))


# Sized toward 60 minutes (full) and 8 (quick) on a 2-core CPU. Measured from scratch in one piece
# on a 2-core Intel Xeon virtual machine (2026-12-04, docs/results.md): full 38.3 minutes
# (frontier 13.9, dead 4.8, g-SAE 1.6, IOI 16.3, attention 1.6), quick 5.2. Seeding the IOI
# experiment's architectures cost the full budget 10.3 of those minutes and took quick to 7.5 at
# 3 seeds and 150 prompts, too near its 8; so quick runs 2 seeds and 100 prompts. An earlier
# 2-core AMD EPYC machine took 7.1 minutes for the quick work this one did in 4.5. Tokens are
# whole steps of 4,096 (full: 124 steps, quick: 31).
BUDGETS = {
    "full": Budget(tokens=507_904, eval_tokens=16_384, expansion=8, expansions=(16, 32), ioi_n=500,
                   dead_variants=("topk", "topk+auxk", "mutual_choice+zipf", "feature_choice+zipf")),
    "quick": Budget(tokens=126_976, eval_tokens=4_096, expansion=4, l0s=(8, 32), penalties=(1, 2),
                    expansions=(16,), betas=(1.0,), steer_latents=8, steer_seqs=4, dead_tokens=32_768,
                    ioi_sizes=(128, 512), ioi_n=100, seeds=2, min_seeds=2,
                    dead_variants=("topk", "topk+auxk", "mutual_choice+zipf", "feature_choice+zipf")),
}


@dataclass
class PapersOptions:
    """The papers' claims on the embedded model (evals/papers.py)."""

    quick: bool = False
    """Smaller budgets, the same code path (5.2 minutes on a 2-core machine instead of 38; 2 seeds, not 3)."""
    out: str = "runs/papers"
    """Folder for the caches, every run, results.md and results.html; runs already there are reused."""
    experiments: str = ",".join(EXPERIMENTS)
    """Comma-separated experiments to run: frontier, dead, gsae, ioi, attn."""

    def __post_init__(self):
        unknown = [e for e in self.names() if e not in EXPERIMENTS]
        if unknown or not self.names():
            raise ConfigError(f"--experiments takes a comma-separated subset of {', '.join(EXPERIMENTS)}, "
                              f"not {self.experiments!r}")

    def names(self) -> list[str]:
        return [e.strip() for e in self.experiments.split(",") if e.strip()]


# ---- training and scoring -------------------------------------------------------------------

@dataclass
class Suite:
    """Where the suite writes, and what it has made so far."""

    out: Path
    budget: Budget
    rows: dict[str, list[dict]] = field(default_factory=dict)
    caches: dict[str, Path] = field(default_factory=dict)
    heldout: dict[str, torch.Tensor] = field(default_factory=dict)

    def cache(self, hook: str, dataset: str | None = None, grads: bool = True) -> Path:
        """The activation cache of ``hook`` on saekit's corpus (or on ``dataset``, e.g.
        ``"ioi"``), made once: with the loss's gradients (the g-SAEs need them), or with
        ``grads=False`` activations alone, unless one with gradients is already there, which
        serves as well. Without the backward pass a shard is several times faster (measured
        while another job shared the 2 CPU cores: 20-35 s a shard at blocks.5.attn.hook_z,
        against about 110 s with gradients at blocks.0.attn.hook_z)."""
        full = hook if dataset is None else f"{hook}-{dataset}"
        key = full if grads or (self.out / "caches" / full / "meta.json").exists() else f"{full}.acts"
        if key not in self.caches:
            from saekit.training.config import DataOptions
            from saekit.training.run import cache_activations

            folder = self.out / "caches" / key
            if not (folder / "meta.json").exists():
                b = self.budget
                # one fill more than a run reads: shards hold whole sequences, a little under fill_tokens
                cache_activations(DataOptions(hook=hook, dataset=dataset, total_tokens=b.tokens + b.fill_tokens,
                                              fill_tokens=b.fill_tokens, batch_size=b.batch_size), str(folder),
                                  with_grads=key == full, progress=False)
            self.caches[key] = folder
        return self.caches[key]

    def d_in(self, hook: str, grads: bool = True) -> int:
        """The width of ``hook``'s activations, from its cache (``grads``: as ``cache``)."""
        return json.loads((self.cache(hook, grads=grads) / "meta.json").read_text())["d_in"]

    def train(self, name: str, hook: str, seed: int = 0, dataset: str | None = None, grads: bool = True,
              **kw) -> dict:
        """One SAE from ``hook``'s cache (of ``dataset``, default saekit's corpus; ``grads``:
        the cache with gradients, see ``cache``); its summary (``summary.json``), reused if
        present. ``kw``: SAEConfig fields, and ``optim`` (OptimOptions fields; the warm-up is the
        budget's ``warmup_steps()`` unless given)."""
        from saekit.training.config import DataOptions, OptimOptions, RunOptions, TrainConfig
        from saekit.training.run import run_training
        from saekit.types import SAEConfig, VariantOptions

        folder = self.out / "runs" / f"{name}-seed{seed}"
        if (folder / "summary.json").exists():
            summary = json.loads((folder / "summary.json").read_text())
        else:
            optim = {"warmup_steps": self.budget.warmup_steps(), **kw.pop("optim", {})}
            variant = kw.pop("variant", {})
            b = self.budget
            cfg = TrainConfig(sae=SAEConfig(variant=VariantOptions(**variant), **kw),
                              data=DataOptions(hook=hook, from_cache=str(self.cache(hook, dataset, grads)),
                                               total_tokens=b.tokens, batch_size=b.batch_size),
                              optim=OptimOptions(**optim),
                              run=RunOptions(out=str(folder), seed=seed, progress=False, log_every=10**9,
                                             checkpoint_every=10**9, eval_tokens=b.eval_tokens))
            t = time.time()
            summary = run_training(cfg)
            summary["train_s"] = time.time() - t
            atomic_write_text(folder / "summary.json", json.dumps(summary, indent=1))
        summary["folder"] = str(folder)
        return summary

    def held_out(self, hook: str, model) -> torch.Tensor:
        """Held-out activations at ``hook`` (the summary's draw), for firing frequencies."""
        if hook not in self.heldout:
            from saekit import data
            from saekit.activations import harvest_batches, resolve_hook

            n_seq = max(1, self.budget.eval_tokens // 127)
            tokens = data.heldout_sequences(model.tokenizer, None, n_seq, 128, 1)
            self.heldout[hook] = harvest_batches(model, tokens, resolve_hook(model, hook))
        return self.heldout[hook]


def firing(folder: str, acts: torch.Tensor) -> dict:
    """Firing frequencies of an SAE's latents on ``acts``: the never-fired fraction, the
    fraction firing on fewer than 1e-4 of tokens (under-used, never-fired included), and a
    Zipf fit of the frequencies of the latents that fired against their rank (slope of
    log frequency on log rank, and R² of that line)."""
    from saekit import load_sae
    from saekit.metrics import ReconstructionStream

    sae = load_sae(folder)
    acc = ReconstructionStream(sae.cfg.d_sae, sae.cfg.d_in)
    with torch.no_grad():
        for i in range(0, len(acts), 4096):
            acc.add(acts[i: i + 4096], sae(acts[i: i + 4096]))
    freq = acc.counts.double() / acc.n
    alive = freq[freq > 0].sort(descending=True).values
    out = {"never_fired": (freq == 0).double().mean().item(), "rare": (freq < 1e-4).double().mean().item(),
           "explained_variance": acc.result()["explained_variance"], "freq_sorted": alive.tolist()}
    out.update(zipf_fit(alive))
    return out


def zipf_fit(freq_desc: torch.Tensor) -> dict:
    """Least-squares line through (log rank, log frequency): ``zipf_slope`` (−s of f ∝ rank^−s)
    and ``zipf_r2``."""
    if len(freq_desc) < 3:
        return {"zipf_slope": float("nan"), "zipf_r2": float("nan")}
    x = torch.arange(1, len(freq_desc) + 1, dtype=torch.float64).log()
    y = freq_desc.log()
    xc, yc = x - x.mean(), y - y.mean()
    slope = (xc * yc).sum() / (xc * xc).sum()
    r2 = 1 - ((yc - slope * xc) ** 2).sum() / (yc * yc).sum()
    return {"zipf_slope": slope.item(), "zipf_r2": r2.item()}


def steering_effect(model, sae_folder: str, hook: str, tokens: torch.Tensor, n_latents: int, norm: float,
                    seed: int = 0) -> float:
    """Mean over ``n_latents`` random latents that fired (a fixed draw) of the mean KL(clean ‖
    steered) of the next-token distribution over ``tokens``' positions, when the latent's
    decoder direction, scaled to ``norm``, is added at ``hook`` at every position
    (``saekit.steering.Add`` with value ``norm / ‖W_dec[j]‖``). This is saekit's measure of
    how much a latent's direction does downstream, not a reproduction of Olmo et al.'s own
    steering protocol."""
    from saekit import load_sae
    from saekit.steering import make, steer

    sae = load_sae(sae_folder)
    alive = torch.tensor(json.loads(Path(sae_folder, "alive.json").read_text()))
    g = torch.Generator().manual_seed(seed)
    latents = alive[torch.randperm(len(alive), generator=g)[:n_latents]].tolist()
    with torch.no_grad():
        clean = model(tokens).log_softmax(-1)
        kls = []
        for j in latents:
            value = norm / sae.W_dec[j].norm().item()
            with steer(model, [make("add", sae, j, value)]):
                steered = model(tokens).log_softmax(-1)
            kls.append((clean.exp() * (clean - steered)).sum(-1).mean().item())
    return statistics.fmean(kls)


# ---- verdicts ----------------------------------------------------------------------------------

def interpolate(points: list[tuple[float, float]], l0: float) -> float | None:
    """The value at ``l0`` on a curve of (L0, value) points, linear in log L0; None outside."""
    pts = sorted(points)
    for (l0a, va), (l0b, vb) in zip(pts, pts[1:]):
        if l0a <= l0 <= l0b and l0b > l0a:
            t = (math.log(l0) - math.log(l0a)) / (math.log(l0b) - math.log(l0a))
            return va + t * (vb - va)
    return next((v for x, v in pts if x == l0), None)


def frontier_signs(better: list[tuple[float, float]], worse: list[tuple[float, float]], noise: float) -> list[int]:
    """Signs of ``better − worse`` explained variance at each L0 of either curve inside both
    curves' range: +1 above ``noise``, −1 below −``noise``, 0 within."""
    signs = []
    for l0 in sorted({x for x, _ in better} | {x for x, _ in worse}):
        a, b = interpolate(better, l0), interpolate(worse, l0)
        if a is not None and b is not None:
            signs.append(1 if a - b > noise else -1 if b - a > noise else 0)
    return signs


# ---- the experiments ---------------------------------------------------------------------------

def exp_frontier(s: Suite, log) -> dict:
    """Every architecture at four sparsities on both hooks; the claims judged on explained variance."""
    b = s.budget
    rows, claims = [], []
    for hook in b.hooks:
        short = "attn" if hook == ATTN_HOOK else "resid"
        d_sae = b.expansion * s.d_in(hook)
        for arch in b.selections:
            for k in b.l0s:
                r = s.train(f"frontier-{short}-{arch}-k{k}", hook, d_sae=d_sae, k=k, sparsity=arch)
                rows.append(_frontier_row(hook, arch, f"k={k}", r))
                log(rows[-1])
        for arch in b.elementwise:
            coef, grid = PENALTY_GRID[arch]
            for lam in (grid[i] for i in b.penalties):
                r = s.train(f"frontier-{short}-{arch}-{lam}", hook, d_sae=d_sae, sparsity=arch, optim={coef: lam})
                rows.append(_frontier_row(hook, arch, f"λ={lam}", r))
                log(rows[-1])
        k_mid = b.l0s[len(b.l0s) // 2]  # the noise of one frontier point: TopK's seeds at a middle L0
        seeds = [s.train(f"frontier-{short}-topk-k{k_mid}", hook, seed=i, d_sae=d_sae, k=k_mid, sparsity="topk")
                 for i in range(b.seeds)]
        ev = [r["explained_variance"] for r in seeds]
        noise = max(ev) - min(ev)

        def curve(arch, _hook=hook):
            return [(r["L0"], r["explained variance"]) for r in rows if r["hook"] == _hook and r["arch"] == arch]

        for claim, better, worse, source in (
                ("TopK reconstructs better than ReLU + L1 at equal L0", "topk", "standard",
                 "Gao et al. 2024, §2.3, Fig. 2"),
                ("JumpReLU reconstructs better than ReLU + L1 at equal L0", "jumprelu", "standard",
                 "Rajamanoharan et al. 2024 (JumpReLU), §5, Fig. 2"),
                ("Gated reconstructs better than ReLU + L1 at equal L0", "gated", "standard",
                 "Rajamanoharan et al. 2024 (Gated), §5.1"),
                ("BatchTopK reconstructs better than TopK at equal L0", "batchtopk", "topk",
                 "Bussmann et al. 2024, §4.1")):
            if not (curve(better) and curve(worse)):
                continue  # an architecture this budget leaves out
            signs = frontier_signs(curve(better), curve(worse), noise)
            claims.append({"experiment": "frontier", "hook": hook, "claim": claim, "source": source,
                           "signs": signs, "noise": noise, "verdict": verdict(signs),
                           "numbers": f"EV difference told at {sum(x != 0 for x in signs)} of {len(signs)} shared L0 "
                                      f"points ({sum(x > 0 for x in signs)} for, {sum(x < 0 for x in signs)} against); "
                                      f"noise = spread of {len(ev)} TopK seeds at L0 {k_mid}: {noise:.4f}"})
    return {"rows": rows, "claims": claims}


def _frontier_row(hook: str, arch: str, setting: str, r: dict) -> dict:
    return {"hook": hook, "arch": arch, "setting": setting, "L0": r["l0"],
            "explained variance": r["explained_variance"],
            "CE recovered (mean abl.)": r["ce_loss_recovered_mean"], "KL": r["kl"], "dead": r["dead_frac"],
            "train s": r.get("train_s", float("nan"))}


def exp_dead(s: Suite, log, model) -> dict:
    """Dead and rare latents, and reconstruction, at several widths and equal k."""
    b = s.budget
    acts = s.held_out(ATTN_HOOK, model)
    rows, claims = [], []
    for exp in b.expansions:
        d_sae = exp * s.d_in(ATTN_HOOK)
        for name in b.dead_variants:
            arch, aux = DEAD_VARIANTS[name]
            for seed in range(b.seeds):
                r = s.train(f"dead-{exp}x-{name}", ATTN_HOOK, seed=seed, d_sae=d_sae, k=b.dead_k, sparsity=arch,
                            optim={"aux": aux, "dead_tokens": b.dead_tokens})
                f = firing(r["folder"], acts)
                rows.append({"expansion": exp, "variant": name, "seed": seed, "L0": r["l0"],
                             "explained variance": f["explained_variance"], "never fired": f["never_fired"],
                             "rare (< 1e-4)": f["rare"], "Zipf slope": f["zipf_slope"], "Zipf R²": f["zipf_r2"],
                             "CE recovered (mean abl.)": r["ce_loss_recovered_mean"], "freq": f["freq_sorted"]})
                log({k: v for k, v in rows[-1].items() if k != "freq"})

    def values(exp, variant, key):
        return [r[key] for r in rows if r["expansion"] == exp and r["variant"] == variant]

    for variant in ("mutual_choice+zipf", "feature_choice+zipf"):
        for baseline in ("topk", "topk+auxk"):
            if not (values(b.expansions[0], variant, "L0") and values(b.expansions[0], baseline, "L0")):
                continue  # a variant this budget leaves out
            for what, key, sign in (("fewer never-firing latents", "never fired", -1),
                                    ("better reconstruction", "explained variance", 1)):
                signs = [sign * separated(values(e, variant, key), values(e, baseline, key), b.min_seeds)
                         for e in b.expansions]
                claims.append({"experiment": "dead", "hook": ATTN_HOOK, "source": "Ayonrinde 2024, §5",
                               "claim": f"{variant} has {what} than {baseline} at equal L0",
                               "signs": signs, "verdict": verdict(signs),
                               "numbers": "; ".join(
                                   f"{e}×: {statistics.fmean(values(e, variant, key)):.4f} against "
                                   f"{statistics.fmean(values(e, baseline, key)):.4f}" for e in b.expansions)})
    return {"rows": rows, "claims": claims}


def exp_gsae(s: Suite, log, model) -> dict:
    """g-SAE against TopK at equal k: downstream loss without and with labels, and steering."""
    from saekit import data

    b = s.budget
    d_sae = b.expansion * s.d_in(ATTN_HOOK)
    acts = s.held_out(ATTN_HOOK, model)
    norm = acts.norm(dim=-1).median().item()  # one steering norm for both SAEs: a typical activation's
    tokens = data.heldout_sequences(model.tokenizer, None, b.steer_seqs, 128, 7)
    rows = []
    settings = [("topk", 0.0)] + [("gtopk", beta) for beta in b.betas]
    for arch, beta in settings:
        n_seeds = b.seeds if beta in (0.0, 1.0) else 1
        for seed in range(n_seeds):
            r = s.train(f"gsae-{arch}-b{beta}", ATTN_HOOK, seed=seed, d_sae=d_sae, k=b.gsae_k, sparsity=arch,
                        variant={"beta": beta} if arch == "gtopk" else {})
            _write_alive(r["folder"], acts)
            grads = r.get("with_model_gradients", {})
            rows.append({"arch": arch, "beta": beta, "seed": seed, "L0": r["l0"],
                         "explained variance": r["explained_variance"],
                         "CE recovered (mean abl.)": r["ce_loss_recovered_mean"], "KL": r["kl"],
                         "last-position CE, clean": grads.get("ce_loss_clean_last", float("nan")),
                         "as TopK": grads.get("ce_loss_sae_topk_last", float("nan")),
                         "selecting with gradients": grads.get("ce_loss_sae_with_grads_last", float("nan")),
                         "steering KL": steering_effect(model, r["folder"], ATTN_HOOK, tokens, b.steer_latents, norm,
                                                        seed)})
            log(rows[-1])

    def values(arch, beta, key):
        return [r[key] for r in rows if r["arch"] == arch and r["beta"] == beta]

    claims = []
    for what, key, sign in (("higher CE loss recovered (no labels at inference)", "CE recovered (mean abl.)", 1),
                            ("lower KL (no labels at inference)", "KL", -1),
                            ("latents that move the next-token distribution more when added", "steering KL", 1)):
        signs = [sign * separated(values("gtopk", 1.0, key), values("topk", 0.0, key), b.min_seeds)]
        claims.append({"experiment": "gsae", "hook": ATTN_HOOK, "source": "Olmo et al. 2024, §4",
                       "claim": f"g-SAE (β = 1) has {what} than TopK at equal k", "signs": signs,
                       "verdict": verdict(signs),
                       "numbers": f"{statistics.fmean(values('gtopk', 1.0, key)):.4f} against "
                                  f"{statistics.fmean(values('topk', 0.0, key)):.4f} "
                                  f"({len(values('gtopk', 1.0, key))} seeds each); steering norm {norm:.3f}"})
    return {"rows": rows, "claims": claims}


def _write_alive(folder: str, acts: torch.Tensor) -> None:
    """``alive.json``: the latents that fired on the held-out activations (steering draws from them)."""
    path = Path(folder, "alive.json")
    if path.exists():
        return
    from saekit import load_sae

    sae = load_sae(folder)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for i in range(0, len(acts), 4096):
            codes = sae(acts[i: i + 4096]).codes
            fired[codes.indices[codes.values != 0]] = True
    atomic_write_text(path, json.dumps(fired.nonzero().flatten().tolist()))


# ---- the suite ------------------------------------------------------------------------------

def run_papers(opts: PapersOptions, budget: Budget | None = None, log=print) -> dict:
    """Run the chosen experiments, write ``results.md`` and ``results.html`` in ``opts.out``
    and return ``{experiment: {"rows": [...], "claims": [...]}}`` (``ioi`` and ``attn`` add
    their own ``"tables"``, ``attn`` its ``"figures"``)."""
    from saekit.models import load_model

    budget = budget or BUDGETS["quick" if opts.quick else "full"]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = out / "budget.json"  # runs are reused only under the budget that made them
    if kept.exists() and json.loads(kept.read_text()) != json.loads(json.dumps(asdict(budget))):
        raise ConfigError(f"{out} holds runs made with another budget; pass another --out (or delete it)")
    atomic_write_text(kept, json.dumps(asdict(budget), indent=1))
    s = Suite(out, budget)
    model = load_model()
    t = time.time()
    results, seconds = {}, {}
    for name in opts.names():
        log(f"== {name}")
        t_exp = time.time()
        fn = {"frontier": lambda: exp_frontier(s, log), "dead": lambda: exp_dead(s, log, model),
              "gsae": lambda: exp_gsae(s, log, model), "ioi": lambda: exp_ioi(s, log, model),
              "attn": lambda: exp_attn(s, log, model)}[name]
        results[name] = fn()
        seconds[name] = time.time() - t_exp
    mode = next((name for name, b in BUDGETS.items() if b == budget), "custom")
    meta = {"budget": asdict(budget), "mode": mode, "seconds": time.time() - t, "experiment_seconds": seconds,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_name()}
    from saekit.evals.papers_report import write_report

    write_report(out, results, meta)
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def quick_budget_for_tests() -> Budget:
    """Toy sizes for the test suite: every experiment's code path in about a minute."""
    return replace(BUDGETS["quick"], tokens=8192, eval_tokens=1024, expansion=2, l0s=(4, 8), expansions=(2,),
                   hooks=(ATTN_HOOK,), selections=("topk",), elementwise=("standard",),
                   dead_variants=("topk", "mutual_choice+zipf"), dead_k=4, dead_tokens=2048, betas=(1.0,), gsae_k=4,
                   steer_latents=2, steer_seqs=2, seeds=2, min_seeds=2, batch_size=1024, fill_tokens=4096,
                   ioi_sizes=(64, 256), ioi_k=8, ioi_n=40)
