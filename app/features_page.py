"""Features: the latent list (sortable by frequency, searchable by top token) and a feature
card (histogram, top contexts shaded by activation, logit effects, head attribution, DFA by
source token for a chosen context)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from saekit.app import render
from saekit.app.resources import Loaded, model_lock
from saekit.attention import dfa, head_attribution, logit_effect
from saekit.errors import SaekitError
from saekit.evals.features import hist_edges
from saekit.hooks import hook_z_layer

SORTS = {"frequency, high first": ("frequency", False), "frequency, low first": ("frequency", True),
         "max activation": ("max act", False), "latent": ("latent", True)}


@st.cache_resource(show_spinner=False)
def _table(sae_path: str, _stats, created: str, _tokenizer) -> pd.DataFrame:
    """One row per latent; cached per statistics file (``created`` changes with each analyze)."""
    s = _stats
    peak = s.peak_token_ids().tolist()
    words = _tokenizer.batch_decode([[max(t, 0)] for t in peak])
    top = [render.token_label(w) if t >= 0 else "" for w, t in zip(words, peak)]
    boosts = [""] * s.d_sae
    if "boosted_ids" in s.extra:
        first = s.extra["boosted_ids"][:, 0].tolist()
        boosts = [render.token_label(w) for w in _tokenizer.batch_decode([[t] for t in first])]
    return pd.DataFrame({"latent": range(s.d_sae), "frequency": s.freq.numpy(), "mean act": s.mean_act.numpy(),
                         "max act": s.max_act.numpy(), "top token": top, "boosts": boosts})


def _latent_list(ld: Loaded) -> None:
    table = _table(ld.sae_path, ld.stats, ld.stats.meta.get("created", ""), ld.model.tokenizer)
    c1, c2 = st.columns(2)
    sort = c1.selectbox("Sort by", list(SORTS), key="feat_sort")
    query = c2.text_input("Search by top token", key="feat_search", placeholder="e.g. Mary")
    if query.strip():
        q = query.strip().lower()
        table = table[table["top token"].str.lower().str.contains(q, regex=False)
                      | table["boosts"].str.lower().str.contains(q, regex=False)]
    col, asc = SORTS[sort]
    table = table.sort_values(col, ascending=asc, kind="stable")
    st.caption(f"{len(table)} latents; statistics over {ld.stats.meta['n_tokens']:,} tokens "
               f"of {ld.stats.meta['dataset']}")
    st.dataframe(table.head(500), hide_index=True, height=250, width="stretch",
                 column_config={"frequency": st.column_config.NumberColumn(format="%.5f"),
                                "mean act": st.column_config.NumberColumn(format="%.3f"),
                                "max act": st.column_config.NumberColumn(format="%.3f")})


def _logit_effects(ld: Loaded, latent: int) -> tuple[list, list] | None:
    """(boosted, suppressed) lists of (token, value), from the statistics or computed now."""
    tok = ld.model.tokenizer
    if ld.stats is not None and "boosted_ids" in ld.stats.extra:
        e = ld.stats.extra

        def pairs(ids, vals):
            return list(zip(tok.batch_decode([[t] for t in ids[latent].tolist()]), vals[latent].tolist()))

        return pairs(e["boosted_ids"], e["boosted_values"]), pairs(e["suppressed_ids"], e["suppressed_values"])
    if _is_hook_z(ld):
        eff = logit_effect(ld.model, ld.sae, latent, top=10)
        return eff.boosted, eff.suppressed
    return None


def _is_hook_z(ld: Loaded) -> bool:
    return hook_z_layer(ld.sae.cfg.hook_name) is not None


def card(ld: Loaded, latent: int) -> None:
    """The feature card of one latent (the statistics' parts only when they exist)."""
    s, tok = ld.stats, ld.model.tokenizer
    st.subheader(f"Latent {latent}")
    if s is not None:
        m = st.columns(3)
        m[0].metric("firing frequency", f"{s.freq[latent].item():.5f}")
        m[1].metric("mean activation", f"{s.mean_act[latent].item():.3f}")
        m[2].metric("max activation", f"{s.max_act[latent].item():.3f}")
    left, right = st.columns(2)
    if s is not None:
        left.plotly_chart(render.histogram(s.hist[latent].tolist(), hist_edges().tolist()),
                          width="stretch", key="card_hist")
    effects = _logit_effects(ld, latent)
    if effects is not None:
        up, down = effects
        right.markdown("**Logit effects** (direct path)")
        right.dataframe(pd.DataFrame({"boosts": [render.token_label(t) for t, _ in up], "+": [v for _, v in up],
                                      "suppresses": [render.token_label(t) for t, _ in down],
                                      "−": [v for _, v in down]}), hide_index=True, width="stretch")
    if _is_hook_z(ld):
        share = (s.extra["head_attr"][latent] if s is not None and "head_attr" in s.extra
                 else head_attribution(ld.sae, ld.model)[latent])
        st.plotly_chart(render.bars([f"head {h}" for h in range(len(share))], share.tolist(),
                                    "Head attribution (decoder norm share)"), width="stretch",
                        key="card_heads")
    if s is None:
        return
    contexts = s.contexts(latent)
    if not contexts:
        st.info("This latent never fired on the analyzed tokens.")
        return
    st.markdown("**Top activating contexts** (shade: activation; underlined: peak token)")
    vmax = max(c.value for c in contexts)
    rows = [(c.value, render.shaded_tokens(tok.batch_decode([[t] for t in c.tokens]), c.acts.tolist(), vmax,
                                           c.peak)) for c in contexts]
    st.html(render.context_block(rows))
    if _is_hook_z(ld):
        _dfa(ld, latent, contexts)


def _dfa(ld: Loaded, latent: int, contexts) -> None:
    labels = [f"#{j + 1} ({c.value:.2f})" for j, c in enumerate(contexts)]
    j = st.selectbox("Direct feature attribution for context", range(len(contexts)),
                     format_func=labels.__getitem__, key=f"dfa_context_{latent}")
    prefix = contexts[j].prefix
    with model_lock():
        d = dfa(ld.model, ld.sae, prefix.long(), latent, dest=-1)
    words = ld.model.tokenizer.batch_decode([[t] for t in prefix.tolist()])
    st.plotly_chart(render.dfa_by_source(words, d.by_source, f"DFA at the peak token by source token "
                                         f"(bias {d.bias:+.3f})"), width="stretch", key="card_dfa")


def page(ld: Loaded) -> None:
    st.header("Features")
    if ld.stats is None:
        st.warning(f"No feature statistics: {ld.stats_error}. The card below shows what needs none.")
    else:
        _latent_list(ld)
    latent = st.number_input("Latent", min_value=0, step=1, key="latent",
                             help=f"0 to {ld.sae.cfg.d_sae - 1}")
    if latent >= ld.sae.cfg.d_sae:
        st.error(f"Latent {latent} is out of range: this SAE has {ld.sae.cfg.d_sae} latents "
                 f"(0 to {ld.sae.cfg.d_sae - 1}).")
        return
    try:
        card(ld, int(latent))
    except SaekitError as e:
        st.error(str(e))
