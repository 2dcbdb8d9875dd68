"""results.md and results.html of `saekit bench papers` (evals/papers.py)."""

from __future__ import annotations

import datetime
import html
import math
import statistics
from pathlib import Path

from saekit.files import atomic_write_text

RULES = ("A difference is told only when the seeds of the two configurations do not overlap (every "
         "seed of one beats every seed of the other), or, for a single-seed frontier point, when it "
         "exceeds the spread (max − min) of TopK's seeds at the middle L0 on the same hook. A claim "
         "holds when every told comparison goes its way and at least one is told; it does not hold "
         "when one is told against it; otherwise it cannot be told at this scale.")


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return " ".join(f"{x:+d}" for x in v) if all(isinstance(x, int) for x in v) else str(v)
    return str(v)


def md_table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out


def html_table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def mean_sd(rows: list[dict], keys: list[str], by: list[str], skip=("seed", "freq")) -> list[dict]:
    """One row per ``by`` group: each numeric key as ``mean ± sd`` over the group's seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[b] for b in by), []).append(r)
    out = []
    for g, rs in groups.items():
        row = dict(zip(by, g))
        row["seeds"] = len(rs)
        for k in keys:
            if k in by or k in skip or k not in rs[0]:
                continue
            vals = [r[k] for r in rs]
            if any(math.isnan(v) for v in vals):
                row[k] = "—"  # not measured for this configuration (TopK selects without gradients)
                continue
            mean = statistics.fmean(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            row[k] = f"{mean:.4g} ± {sd:.2g}" if len(vals) > 1 else f"{mean:.4g}"
        out.append(row)
    return out


def figures(results: dict) -> list:
    """Plotly figures: the frontier per hook (explained variance, CE recovered and KL against
    L0), firing frequency against rank at the widest expansion, g-SAE steering effect."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figs = []
    if "frontier" in results:
        rows = results["frontier"]["rows"]
        for hook in dict.fromkeys(r["hook"] for r in rows):
            metrics = ["explained variance", "CE recovered (mean abl.)", "KL"]
            fig = make_subplots(rows=1, cols=3, subplot_titles=metrics)
            for i, arch in enumerate(dict.fromkeys(r["arch"] for r in rows)):
                pts = sorted((r["L0"], r) for r in rows if r["hook"] == hook and r["arch"] == arch)
                for c, m in enumerate(metrics, 1):
                    fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1][m] for p in pts], mode="lines+markers",
                                             name=arch, legendgroup=arch, showlegend=c == 1,
                                             line={"color": _COLORS[i % len(_COLORS)]}), row=1, col=c)
                    fig.update_xaxes(type="log", title_text="mean L0", row=1, col=c)
            fig.update_layout(title=f"Sparsity against fidelity at {hook}", height=420)
            figs.append(fig)
    if "dead" in results:
        rows = results["dead"]["rows"]
        widest = max(r["expansion"] for r in rows)
        fig = go.Figure()
        for r in rows:
            if r["expansion"] == widest and r["seed"] == 0 and r["freq"]:
                fig.add_trace(go.Scatter(x=list(range(1, len(r["freq"]) + 1)), y=r["freq"], mode="lines",
                                         name=r["variant"]))
        fig.update_xaxes(type="log", title_text="rank")
        fig.update_yaxes(type="log", title_text="firing frequency")
        fig.update_layout(title=f"Firing frequency against rank, {widest}× expansion (seed 0; Zipf is a line)")
        figs.append(fig)
    if "gsae" in results:
        rows = results["gsae"]["rows"]
        names = [f"{r['arch']} β={r['beta']}" for r in rows]
        fig = go.Figure(go.Box(x=names, y=[r["steering KL"] for r in rows], boxpoints="all"))
        fig.update_layout(title="Steering effect: mean KL after adding a latent's direction (each point a seed)",
                          yaxis_title="KL (nats)")
        figs.append(fig)
    for r in results.values():  # experiments that make their own figures
        figs += r.get("figures", [])
    return figs


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]

FRONTIER_COLS = ["hook", "arch", "setting", "L0", "explained variance", "CE recovered (mean abl.)", "KL", "dead",
                 "train s"]
DEAD_COLS = ["expansion", "variant", "seeds", "L0", "explained variance", "never fired", "rare (< 1e-4)",
             "Zipf slope", "Zipf R²", "CE recovered (mean abl.)"]
GSAE_COLS = ["arch", "beta", "seeds", "L0", "explained variance", "CE recovered (mean abl.)", "KL",
             "last-position CE, clean", "as TopK", "selecting with gradients", "steering KL"]
CLAIM_COLS = ["experiment", "hook", "claim", "source", "verdict", "numbers"]


def sections(results: dict) -> list[tuple[str, list[dict], list[str]]]:
    """(title, rows, columns) of every table, in page order."""
    claims = [c for r in results.values() for c in r["claims"]]
    out = [("Verdicts", claims, CLAIM_COLS)]
    if "frontier" in results:
        out.append(("Sparsity against fidelity (one seed a point)", results["frontier"]["rows"], FRONTIER_COLS))
    if "dead" in results:
        rows = results["dead"]["rows"]
        out.append(("Dead and under-used latents (mean ± sd over seeds)",
                    mean_sd(rows, DEAD_COLS, ["expansion", "variant"]), DEAD_COLS))
    if "gsae" in results:
        rows = results["gsae"]["rows"]
        out.append(("g-SAE against TopK (mean ± sd over seeds)", mean_sd(rows, GSAE_COLS, ["arch", "beta"]),
                    GSAE_COLS))
    for r in results.values():  # experiments that lay out their own tables: [(title, rows, columns)]
        out += [tuple(t) for t in r.get("tables", [])]
    return out


def write_report(out: Path, results: dict, meta: dict) -> None:
    """``out/results.md`` and ``out/results.html`` (written to temporary names, then renamed)."""
    from saekit.evals.report import write_report as write_html

    when = datetime.date.today().isoformat()
    command = {"full": "`saekit bench papers`", "quick": "`saekit bench papers --quick`"}.get(
        meta["mode"], "`saekit.evals.papers.run_papers` with a budget of its own")
    parts = ", ".join(f"{name} {sec / 60:.1f}" for name, sec in meta.get("experiment_seconds", {}).items())
    head = [f"Run {when} on {meta['cpu']}, torch {meta['torch']}, {meta['threads']} threads; "
            f"{command} ({meta['mode']} budget: "
            f"{meta['budget']['tokens']:,} training activations an SAE, {meta['budget']['eval_tokens']:,} held-out "
            f"tokens a score); {meta['seconds'] / 60:.1f} minutes" + (f" ({parts})" if parts else "") + ".",
            "", RULES]
    lines = ["# The seed papers' claims on the embedded model", "", *head, ""]
    for title, rows, cols in sections(results):
        lines += [f"## {title}", "", *md_table(rows, cols), ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    parts = [f"<p>{html.escape(p)}</p>" for p in head if p]
    for title, rows, cols in sections(results):
        parts += [f"<h2>{html.escape(title)}</h2>", html_table(rows, cols)]
    parts += figures(results)
    write_html(out / "results.html", "The seed papers' claims on the embedded model", parts)
