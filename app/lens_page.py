"""Prompt lens: a prompt read through the SAE; each token with its top latents, and a way
through to any latent's card."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from saekit.app import render
from saekit.app.resources import Loaded, model_lock
from saekit.errors import SaekitError
from saekit.evals.features import prompt_lens

EXAMPLE = "When Mary and John went to the store, John gave a drink to"
TOP = 3


def open_card(latent: int) -> None:
    """Button callback: show ``latent``'s card on the Features page."""
    st.session_state["latent"] = int(latent)
    st.session_state["page"] = "Features"


def page(ld: Loaded) -> None:
    st.header("Prompt lens")
    prompt = st.text_area("Prompt", value=EXAMPLE, key="lens_prompt", height=80)
    if not prompt.strip():
        st.warning("The prompt is empty: type some text to read it through the SAE.")
        return
    try:
        with model_lock():
            lens = prompt_lens(ld.model, ld.sae, prompt)
    except SaekitError as e:
        st.error(str(e))
        return
    acts = lens.acts[1:]  # [T-1, d_sae]: BOS has no code
    words = lens.tokens[1:]
    vals, idx = acts.topk(min(TOP, acts.shape[1]), dim=1)  # [T-1, TOP]
    st.markdown("**Tokens** (shade: the strongest latent's activation on each)")
    peak = vals[:, 0].tolist()
    st.html(render.context_block([(max(peak), render.shaded_tokens(words, peak, max(peak)))]))
    rows = {"position": range(1, len(words) + 1), "token": [render.token_label(w) for w in words]}
    for r in range(vals.shape[1]):
        rows[f"latent {r + 1}"] = [f"{i} ({v:.2f})" if v > 0 else "" for i, v in zip(idx[:, r].tolist(),
                                                                                       vals[:, r].tolist())]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

    present = sorted({i for i, v in zip(idx.flatten().tolist(), vals.flatten().tolist()) if v > 0},
                     key=lambda i: -acts[:, i].max().item())
    if not present:
        st.info("No latent fires on this prompt.")
        return
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    chosen = c1.selectbox("Latent", present, key="lens_latent",
                          format_func=lambda i: f"{i} (max {acts[:, i].max().item():.2f})")
    c2.button("Open its card", key="lens_open", on_click=open_card, args=(chosen,))
    st.html(render.context_block([(acts[:, chosen].max().item(),
                                   render.shaded_tokens(words, acts[:, chosen].tolist(),
                                                        acts[:, chosen].max().item()))]))
