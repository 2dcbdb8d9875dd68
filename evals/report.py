"""HTML reports with Plotly figures for ``eval.json`` and ``ioi_eval.json``.

A report loads ``plotly.min.js`` from its own folder or, where that folder has none, from the
folder above it (``pretrained/saes/`` keeps one copy for all its SAEs); with neither, the
script is written once beside the report. Reports open offline either way.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from saekit.files import atomic_write_text

PLOTLY_JS = "plotly.min.js"


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def write_report(path: Path, title: str, parts: list) -> None:
    """Write ``parts`` (HTML strings and Plotly figures) as one page at ``path``."""
    path = Path(path)
    src = PLOTLY_JS
    if not (path.parent / PLOTLY_JS).exists():
        if (path.parent.parent / PLOTLY_JS).exists():
            src = f"../{PLOTLY_JS}"  # a collection of SAE folders shares one 4.6 MB script
        else:
            atomic_write_text(path.parent / PLOTLY_JS, get_plotlyjs())
    body = "\n".join(p if isinstance(p, str) else p.to_html(full_html=False, include_plotlyjs=False) for p in parts)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<script src='{src}'></script><style>body{{font-family:sans-serif;margin:2em}}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
            f"</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>")
    atomic_write_text(path, page)


def eval_parts(r: dict) -> list:
    """The figures of ``saekit eval``."""
    keys = ["l0", "l0_std", "explained_variance", "fvu", "ce_loss_recovered_mean", "ce_loss_recovered_zero_all",
            "ce_loss_recovered_zero_keep_bos", "kl", "never_fired_frac", "dense_frac", "tokens"]
    h = r["log10_freq_hist"]
    freq = go.Figure(go.Bar(x=h["edges"][:-1], y=h["counts"], width=h["edges"][1] - h["edges"][0]))
    freq.update_layout(title="Firing frequency of live latents", xaxis_title="log10 frequency", yaxis_title="latents")
    l0 = go.Figure(go.Bar(x=list(range(len(r["l0_hist"]))), y=r["l0_hist"]))
    l0.update_layout(title="Active latents per token", xaxis_title="L0", yaxis_title="tokens")
    names = ["clean", "SAE", "mean ablation", "zero ablation (BOS kept)", "zero ablation (all positions)"]
    ce = go.Figure(go.Bar(x=names, y=[r["ce_loss_clean"], r["ce_loss_sae"], r["ce_loss_mean_ablation"],
                                      r.get("ce_loss_zero_ablation_keep_bos"), r.get("ce_loss_zero_ablation_all")]))
    ce.update_layout(title="Next-token loss", yaxis_title="nats")
    k = "" if r.get("k") is None else f", k={r['k']}"  # elementwise SAEs select no k: their L0 is in the table
    parts = [f"<p>{html.escape(r['hook'])}, {r['sparsity']}, d_sae={r['d_sae']}{k}; "
             f"held-out text: {html.escape(r.get('eval_split', 'not recorded'))}</p>",
             "<p>never_fired_frac: latents with no activation on these tokens (not the training run's dead_frac). "
             "Zero ablation 'all positions' zeroes BOS too (Kissane et al.'s baseline); 'BOS kept' zeroes "
             "the positions the SAE replaces.</p>",
             _table([{k: r.get(k, "not in this file (older saekit): rerun saekit eval") for k in keys}], keys),
             freq, l0, ce]
    g = r.get("with_model_gradients")
    if g:
        gk = ["positions", "ce_loss_clean_last", "ce_loss_sae_topk_last", "ce_loss_sae_with_grads_last",
              "explained_variance", "l0"]
        parts += [f"<h2>g-SAE selecting with gradients</h2><p>{html.escape(g['gradients'])}; "
                  f"{html.escape(g['scored'])}. The table above selects as TopK (no gradients).</p>",
                  _table([{k: g[k] for k in gk}], gk)]
    return parts


def ioi_parts(r: dict) -> list:
    """The figures of ``saekit eval-ioi``: approximation bars, edit accuracy against weight
    removed per budget (latents changed), F1 heatmaps, occlusion/over-splitting, and the node
    table. A g-SAE appears twice: without gradients and with model-target gradients."""
    parts = [f"<p>model {html.escape(r['model'])}, layer {r['layer']}, {r['n_eval']} evaluation prompts, "
             f"{r['n_fit']} fitting prompts. IOI nodes: {html.escape(', '.join(r['ioi_nodes']))}</p>"]
    for name, n in r["nodes"].items():
        parts.append(f"<h2>Node {html.escape(name)}</h2>")
        parts += _node_parts(name, n)
    has_effects = r["node_table"] and "effect" in r["node_table"][0]
    cols = ["node", "effect", "ld_clean", "ld_ablated"] if has_effects else ["node"]
    parts += ["<h2>Nodes: mean-ablation effect on the logit difference</h2>", _table(r["node_table"][:24], cols)]
    return parts


def _node_parts(name: str, n: dict) -> list:
    rows = {f"supervised ({m})": s["approximation"] for m, s in n["supervised"].items()}
    rows.update({label: s["approximation"] for label, s in n["saes"].items()})
    approx = go.Figure([go.Bar(name=k, x=list(rows), y=[v[k] for v in rows.values()])
                        for k in ("sufficiency", "necessity")])
    approx.update_layout(title=f"{name}: approximation", barmode="group", yaxis_title="share of logit difference")
    parts = [approx]
    for attr in n["unedited_accuracy"]:
        fig = go.Figure()
        for m, s in n["supervised"].items():
            c = s["control"][attr]
            fig.add_trace(go.Scatter(x=[c["weight_removed"]], y=[c["accuracy"]], mode="markers",
                                     marker_size=12, name=f"supervised ({m})"))
        for label, s in n["saes"].items():
            for kind, per in s["control"][attr].items():
                b = sorted(per, key=int)
                fig.add_trace(go.Scatter(x=[per[k]["weight_removed"] for k in b], y=[per[k]["accuracy"] for k in b],
                                         text=[_budget_text(k, per[k]) for k in b],
                                         mode="lines+markers", name=f"{label} {kind}"))
        fig.update_layout(title=f"{name}: editing {attr}, budgets in latents changed "
                                f"(unedited accuracy {n['unedited_accuracy'][attr]:.2f})",
                          xaxis_title="weight removed", yaxis_title="edit accuracy")
        parts.append(fig)
    for label, s in n["saes"].items():
        for attr, hm in s["f1_heatmaps"].items():
            fig = go.Figure(go.Heatmap(z=hm["f1"], x=hm["values"], y=[f"latent {j}" for j in hm["latents"]],
                                       zmin=0, zmax=1, colorscale="Viridis"))
            fig.update_layout(title=f"{name}, {label}: F1 on the evaluation prompts of the latents chosen "
                                    f"on the fit prompts, for {attr} values", height=520)
            parts.append(fig)
        occ = [{"attribute": a, **{k: v for k, v in o.items() if k != "by"}, "shadowed by": ", ".join(o["by"]),
                "over-split values": s["oversplitting"][a],
                "mean best F1": s["interpretability"][a]["mean_best_f1"],
                "coverage (F1 ≥ 0.7)": s["interpretability"][a]["coverage"]} for a, o in s["occlusion"].items()]
        selection = f"<p>selection: {html.escape(s['selection'])}</p>" if "selection" in s else ""
        parts += [f"<h3>{html.escape(label)}: interpretability, occlusion and over-splitting</h3>", selection,
                  "<p>best latent per value chosen on the fit prompts; its F1 measured on the evaluation prompts</p>",
                  _table(occ, list(occ[0]))]
    return parts


def _budget_text(budget: str, row: dict) -> str:
    """Hover text of one edit: its budget and how many latents it changed on average."""
    changed = f" ({row['latents_changed']:.3g} changed on average)" if "latents_changed" in row else ""
    return f"budget {budget} latents{changed}"


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summary_row(folder: Path) -> dict:
    """One SAE folder in a row, from the files beside it (nothing is recomputed): the
    architecture and its sparsity setting (``train_config.json``), ``saekit eval``'s metrics
    and, at the node L3.END, ``saekit eval-ioi``'s sufficiency, the S-name edit's accuracy
    with 16 latents changed (the better of the interpretation-aware and -agnostic edits) and
    the held-out F1 of the best S-name latents. Columns whose file is absent are left out."""
    folder = Path(folder)
    cfg = _read(folder / "train_config.json") or {}
    optim, sae = cfg.get("optim", {}), cfg.get("sae", {})
    arch = sae.get("sparsity") or (_read(folder / "cfg.json") or {}).get("sparsity", "?")
    weight = {"standard": "l1_coef", "gated": "l1_coef", "jumprelu": "l0_coef"}.get(arch)
    setting = (f"λ={optim[weight]}" if optim.get(weight) else "default λ") if weight else f"k={sae.get('k', '?')}"
    out = {"sae": folder.name, "architecture": arch, "setting": setting}
    ev = _read(folder / "eval.json")
    if ev:
        out |= {"L0": ev["l0"], "explained variance": ev["explained_variance"],
                "CE recovered (mean abl.)": ev["ce_loss_recovered_mean"], "KL": ev["kl"],
                "never fired": ev["never_fired_frac"], "dense": ev["dense_frac"]}
    ioi = _read(folder / "ioi_eval.json")
    node = (ioi or {}).get("nodes", {}).get("L3.END", {}).get("saes", {}).get(folder.name)
    if node:
        s = node["control"]["s"]
        out |= {"L3.END sufficiency": node["approximation"]["sufficiency"],
                "S edit @16": max(s["aware"]["16"]["accuracy"], s["agnostic"]["16"]["accuracy"]),
                "S best F1": node["interpretability"]["s"]["mean_best_f1"]}
    return out
