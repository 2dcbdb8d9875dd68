"""Presentation only: Plotly figures and token HTML from tensors the library computed."""

from __future__ import annotations

import html

import plotly.graph_objects as go

ORANGE = "255, 140, 0"


def token_label(s: str) -> str:
    """A token as it should look inside a line of text (whitespace made visible)."""
    return s.replace("\n", "⏎").replace("\t", "⇥")


def shaded_tokens(tokens: list[str], acts: list[float], vmax: float, peak: int | None = None) -> str:
    """Tokens as HTML spans whose orange shade is ``act / vmax``; the peak token is underlined."""
    vmax = vmax if vmax > 0 else 1.0
    spans = []
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = max(0.0, min(1.0, a / vmax))
        style = f"background: rgba({ORANGE}, {alpha:.2f}); border-radius: 3px; white-space: pre-wrap;"
        if i == peak:
            style += " border-bottom: 2px solid #333;"
        title = f"{a:.3f}" if a > 0 else "0"
        spans.append(f'<span style="{style}" title="{title}">{html.escape(token_label(t))}</span>')
    return "".join(spans)


def context_block(rows: list[tuple[float, str]]) -> str:
    """Lines ``value | shaded tokens`` in a monospace block."""
    lines = [f'<div style="display: flex; margin: 3px 0;"><span style="flex: 0 0 4.5em; color: #666;">{v:.2f}</span>'
             f'<span style="flex: 1;">{body}</span></div>' for v, body in rows]
    return '<div style="font-family: monospace; font-size: 0.85em; line-height: 1.7;">' + "".join(lines) + "</div>"


def _small(fig: go.Figure, title: str, height: int = 260) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40, b=10), showlegend=False)
    return fig


def histogram(counts, edges, title: str = "Activation histogram (when firing)") -> go.Figure:
    """Bars of the log-spaced histogram, trimmed to the bins that have counts."""
    nz = [i for i, c in enumerate(counts) if c > 0]
    if not nz:
        return _small(go.Figure(), title + ": never fires")
    lo, hi = nz[0], nz[-1] + 1
    centers = [(edges[i] * edges[i + 1]) ** 0.5 for i in range(lo, hi)]
    widths = [edges[i + 1] - edges[i] for i in range(lo, hi)]
    fig = go.Figure(go.Bar(x=centers, y=counts[lo:hi], width=widths, marker_color=f"rgb({ORANGE})"))
    fig.update_xaxes(title="activation", type="log")
    fig.update_yaxes(title="tokens")
    return _small(fig, title)


def bars(labels: list[str], values: list[float], title: str, horizontal: bool = False) -> go.Figure:
    if horizontal:
        fig = go.Figure(go.Bar(y=labels[::-1], x=values[::-1], orientation="h", marker_color=f"rgb({ORANGE})"))
    else:
        fig = go.Figure(go.Bar(x=labels, y=values, marker_color=f"rgb({ORANGE})"))
    return _small(fig, title)


def dfa_by_source(labels: list[str], by_source, title: str) -> go.Figure:
    """Stacked bars: one trace per head over the source tokens (``by_source [n_heads, T]``)."""
    fig = go.Figure()
    x = [f"{i}:{token_label(t)}" for i, t in enumerate(labels)]
    for h, row in enumerate(by_source.tolist()):
        fig.add_trace(go.Bar(x=x, y=row, name=f"head {h}"))
    fig.update_layout(barmode="relative", showlegend=True)
    fig.update_yaxes(title="contribution to the pre-activation")
    return _small(fig, title, height=320).update_layout(showlegend=True)
