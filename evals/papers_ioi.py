"""Experiment ``ioi`` of `saekit bench papers`: every architecture against supervised IOI
dictionaries on the three axes of Makelov, Lange & Nanda (2024), "Towards principled
evaluations of sparse autoencoders for interpretability and control" (arXiv 2405.08366).

The SAEs, all at ``blocks.3.attn.hook_z`` (the IOI node of the embedded model) with k =
``ioi_k`` (the elementwise ones at the penalty whose corpus L0 is nearest ``ioi_k``):

- every architecture trained on saekit's corpus (the frontier's runs, reused when it ran) and
  on IOI prompts alone (``--dataset ioi``), as the paper trains both kinds, each over the
  budget's ``seeds`` (the corpus-versus-IOI differences are a few hundredths, within one seed's
  spread);
- TopK over ``ioi_sizes`` latents, on both, since the paper's occlusion and over-splitting
  depend on the dictionary's size (one seed).

Seed 0 of each architecture is its row in the claims that compare single SAEs; the spread of
TopK's corpus seeds is the noise their differences must exceed.

They are scored by ``saekit.evals.ioi_eval.evaluate_ioi`` at the whole layer's node, L3.END
(methods.md §7 and docs/evaluation.md give every measure), beside the mean and least-squares
supervised dictionaries fitted there. An attribute is *used* at the node when the supervised
edit of it changes the model's prediction on ≥ 50% of prompts (occlusion's test); the control
and interpretability claims read the used attributes only, since an edit of an attribute the
node does not carry is right whatever the dictionary does.

Claims and their rules (signs: +1 the claim's way, −1 against, 0 not told; ``verdict`` of
papers_common turns the signs into the verdict):

- supervised dictionaries edit better than SAEs at an equal number of changed elements: the
  supervised edit exchanges two features (``a − u_v + u_v'``); against it each SAE's better
  edit (interpretation-aware or agnostic) with 2 latents changed; one sign per SAE (seed 0)
  and used attribute, told when the difference exceeds ``noise``, the spread (max − min) of
  TopK's corpus seeds on the same measure;
- SAEs trained on IOI prompts edit better than the same architecture trained on the corpus
  (the better edit at 16 latents changed) and have better held-out F1 (each value's
  fit-chosen best latent): one sign per architecture and used attribute, told when the two
  sets of seeds do not overlap (``separated``, at least ``min_seeds`` each);
- occlusion and over-splitting appear at some dictionary size: +1 when any SAE scored shows
  the phenomenon (``axes.occlusion`` / ``axes.oversplitting``), −1 when none does. The paper
  reports both in SAEs of GPT-2 small; saekit's operational tests are in methods.md §7.

Where this departs from the paper: one node (the layer's z at END) rather than the paper's
per-head nodes, the embedded 6-layer model rather than GPT-2 small, and SAEs of 124 steps.
"""

from __future__ import annotations

from pathlib import Path

from saekit.evals import axes
from saekit.evals.papers_common import ATTN_HOOK, PENALTY_GRID, separated, verdict

SOURCE = "Makelov, Lange & Nanda 2024 (arXiv 2405.08366)"
NODE = "L3.END"
ATTRS = ("io", "s", "pos")
USED = 0.5  # a supervised edit that changes the prediction this often marks the attribute as used


def _trained(s, log) -> dict[str, dict]:
    """Every SAE the experiment scores: run folder's name → {"summary", "arch", "data", "d_sae", "role"}."""
    b = s.budget
    d_sae = b.expansion * s.d_in(ATTN_HOOK)
    out = {}

    def add(name, role, arch, data, size, **kw):
        summary = s.train(name, ATTN_HOOK, dataset="ioi" if data == "IOI" else None, **kw)
        label = Path(summary["folder"]).name
        out[label] = {"summary": summary, "arch": arch, "data": data, "d_sae": size, "role": role}
        log(f"ioi: {label} L0 {summary['l0']:.1f}")

    def add_arch(arch, corpus_name, ioi_name, **kw):  # an architecture on both data, over the seeds
        for data, name in (("corpus", corpus_name), ("IOI", ioi_name)):
            for seed in range(b.seeds):
                add(name, "architecture" if seed == 0 else "seed", arch, data, d_sae, seed=seed, d_sae=d_sae, **kw)

    for arch in b.selections:
        add_arch(arch, f"frontier-attn-{arch}-k{b.ioi_k}", f"ioi-task-{arch}-k{b.ioi_k}", k=b.ioi_k, sparsity=arch)
    for arch in b.elementwise:
        coef, grid = PENALTY_GRID[arch]
        runs = {lam: s.train(f"frontier-attn-{arch}-{lam}", ATTN_HOOK, d_sae=d_sae, sparsity=arch, optim={coef: lam})
                for lam in (grid[i] for i in b.penalties)}
        lam = min(runs, key=lambda v: abs(runs[v]["l0"] - b.ioi_k))  # the corpus run nearest the L0 of the others
        add_arch(arch, f"frontier-attn-{arch}-{lam}", f"ioi-task-{arch}-{lam}", sparsity=arch, optim={coef: lam})
    for size in b.ioi_sizes:
        if size == d_sae:
            continue  # the architecture rows above
        add(f"ioi-corpus-topk-d{size}", "size", "topk", "corpus", size, d_sae=size, k=b.ioi_k, sparsity="topk")
        add(f"ioi-task-topk-d{size}", "size", "topk", "IOI", size, d_sae=size, k=b.ioi_k, sparsity="topk")
    return out


def best_edit(sae_res: dict, attr: str, budget: int) -> float:
    """The better edit accuracy (interpretation-aware or agnostic) at ``budget`` latents changed."""
    control = sae_res["control"][attr]
    return max(control["aware"][budget]["accuracy"], control["agnostic"][budget]["accuracy"])


def measures(sae_res: dict) -> dict:
    """One SAE's numbers at the node, flat."""
    small, large = min(axes.BUDGETS), max(axes.BUDGETS)
    row = {"L0": sae_res["l0"], "FVU": sae_res["fvu"],
           "sufficiency": sae_res["approximation"]["sufficiency"],
           "necessity": sae_res["approximation"]["necessity"]}
    for a in ATTRS:
        row[f"{a} edit @{small}"] = best_edit(sae_res, a, small)
        row[f"{a} edit @{large}"] = best_edit(sae_res, a, large)
        row[f"{a} best F1"] = sae_res["interpretability"][a]["mean_best_f1"]
    row["occluded"] = ",".join(a for a in ATTRS if sae_res["occlusion"][a]["occluded"]) or "—"
    row["over-split values"] = sum(sae_res["oversplitting"].values())
    return row


def exp_ioi(s, log, model) -> dict:
    """Train (or reuse) the SAEs, score them and the supervised dictionaries at L3.END, judge."""
    from saekit import load_sae
    from saekit.evals.ioi_eval import GRAD_SUFFIX, evaluate_ioi
    from saekit.evals.options import IOIEvalOptions

    b = s.budget
    runs = _trained(s, log)
    saes = {name: load_sae(r["summary"]["folder"]) for name, r in runs.items()}
    res = evaluate_ioi(model, saes, IOIEvalOptions(node=[NODE], n=b.ioi_n, n_fit=2 * b.ioi_n,
                                                   n_table=max(10, b.ioi_n // 4)))["nodes"][NODE]
    small = min(axes.BUDGETS)
    rows = []
    for method, sup in res["supervised"].items():
        row = {"dictionary": f"supervised ({method})", "arch": "supervised", "trained on": "IOI labels",
               "d_sae": "—", "sufficiency": sup["approximation"]["sufficiency"],
               "necessity": sup["approximation"]["necessity"]}
        row.update({f"{a} edit @{small}": sup["control"][a]["accuracy"] for a in ATTRS})
        rows.append(row)
    for name, r in runs.items():
        for label in (name, name + GRAD_SUFFIX):
            if label in res["saes"]:
                rows.append({"dictionary": label, "arch": r["arch"], "trained on": r["data"], "d_sae": r["d_sae"],
                             "role": r["role"], **measures(res["saes"][label])})
    used = [a for a in ATTRS if res["supervised"]["mean"]["control"][a]["changes_output"] >= USED]
    claims = judge(rows, res, used, b.min_seeds)
    tables = [("Supervised IOI dictionaries and SAEs at L3.END (one seed a row; g-SAEs twice)", rows, COLS),
              ("The IOI node: what each attribute's supervised edit does",
               [{"attribute": a, "changes the prediction": res["supervised"]["mean"]["control"][a]["changes_output"],
                 "used": a in used, "unedited accuracy": res["unedited_accuracy"][a]} for a in ATTRS],
               ["attribute", "changes the prediction", "used", "unedited accuracy"])]
    return {"rows": rows, "claims": claims, "tables": tables}


COLS = ["dictionary", "arch", "trained on", "d_sae", "L0", "FVU", "sufficiency", "necessity",
        *[f"{a} edit @{n}" for a in ATTRS for n in (min(axes.BUDGETS), max(axes.BUDGETS))],
        *[f"{a} best F1" for a in ATTRS], "occluded", "over-split values"]


def noise_of(rows: list[dict], key: str) -> float:
    """The spread (max − min) of ``key`` over TopK's corpus seeds at the architectures' width."""
    seeds = [r[key] for r in rows if r["arch"] == "topk" and r["trained on"] == "corpus"
             and r.get("role") in ("architecture", "seed")]
    return max(seeds) - min(seeds) if len(seeds) > 1 else 0.0


def _spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def sign(diff: float, noise: float) -> int:
    return 1 if diff > noise else -1 if diff < -noise else 0


def judge(rows: list[dict], res: dict, used: list[str], min_seeds: int) -> list[dict]:
    """The claims' signs and verdicts, from the rows (see the module's docstring)."""
    small, large = min(axes.BUDGETS), max(axes.BUDGETS)
    saes = [r for r in rows if r["arch"] != "supervised" and r.get("role") != "seed"]
    claims = []

    def claim(text, signs, numbers):
        claims.append({"experiment": "ioi", "hook": ATTN_HOOK, "claim": text, "source": SOURCE, "signs": signs,
                       "verdict": verdict(signs), "numbers": numbers})

    signs, worst = [], []
    for a in used:
        key = f"{a} edit @{small}"
        sup = res["supervised"]["mean"]["control"][a]["accuracy"]
        noise = noise_of(rows, key)
        signs += [sign(sup - r[key], noise) for r in saes]
        worst.append(f"{a}: supervised {sup:.3f}, SAEs {min(r[key] for r in saes):.3f}–"
                     f"{max(r[key] for r in saes):.3f}, noise {noise:.3f}")
    claim(f"the supervised (mean) dictionary's two-feature edit beats every SAE's edit with {small} latents "
          "changed, on the attributes the node uses", signs,
          f"used attributes: {', '.join(used) or 'none'}; " + "; ".join(worst) +
          f"; told for {sum(x > 0 for x in signs)}, against {sum(x < 0 for x in signs)} of {len(signs)}")
    # every seed of each architecture on each data (not the g-SAEs' second scoring, with gradients)
    seeded = [r for r in rows if r.get("role") in ("architecture", "seed") and "(with" not in r["dictionary"]]
    for what, key_of in ((f"edit better (the better edit with {large} latents changed)",
                          lambda a: f"{a} edit @{large}"),
                         ("have better held-out F1 (each value's best latent)", lambda a: f"{a} best F1")):
        signs, parts = [], []
        for a in used:
            for arch in dict.fromkeys(r["arch"] for r in seeded):
                vals = {data: [r[key_of(a)] for r in seeded if r["arch"] == arch and r["trained on"] == data]
                        for data in ("IOI", "corpus")}
                if vals["IOI"] and vals["corpus"]:
                    signs.append(separated(vals["IOI"], vals["corpus"], min_seeds))
                    parts.append(f"{arch} {_spread(vals['IOI'])}/{_spread(vals['corpus'])}")
        claim(f"SAEs trained on IOI prompts {what} than the same architecture trained on the corpus, on the "
              "attributes the node uses", signs,
              "IOI/corpus, mean (min–max) over seeds: " + ", ".join(parts) + f"; told for {sum(x > 0 for x in signs)}, "
              f"against {sum(x < 0 for x in signs)} of {len(signs)}")
    for what, hit in (("occlusion (an used attribute without a latent, shadowed by a larger one)",
                       lambda r: r["occluded"] != "—"),
                      ("over-splitting (a value covered by several precise, partial latents)",
                       lambda r: r["over-split values"] > 0)):
        found = [r["dictionary"] for r in saes if hit(r)]
        sizes = sorted({r["d_sae"] for r in saes})
        claim(f"SAEs show {what} at some dictionary size", [1 if found else -1],
              f"{len(found)} of {len(saes)} SAEs at d_sae {', '.join(map(str, sizes))}"
              + (f": {', '.join(found[:6])}" if found else ""))
    return claims

