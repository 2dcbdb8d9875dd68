"""The saekit explorer (run by ``saekit app``; ``streamlit run`` this file works too).

The sidebar picks the SAE, the model and the page; every page is a function of the loaded
model, SAE and statistics. Bad choices end in a message on the page, never a crash.
"""

import os
from pathlib import Path

import streamlit as st

from saekit.app import evals_page, features_page, lens_page, steering_page
from saekit.app.resources import OTHER, load, sae_choices
from saekit.errors import SaekitError
from saekit.hub import is_hub
from saekit.models import model_name

PAGES = ["Features", "Prompt lens", "Steering", "Evaluations"]

st.set_page_config(page_title="saekit explorer", layout="wide")


def sidebar() -> tuple[str, str, str]:
    st.sidebar.title("saekit explorer")
    page = st.sidebar.radio("Page", PAGES, key="page")
    shipped, start = sae_choices()
    options = [*shipped, OTHER]
    choice = st.sidebar.selectbox("SAE", options, index=options.index(start), key="sae_choice",
                                  help="The SAEs shipped in pretrained/saes/, or any other SAE.")
    if choice == OTHER:
        sae_path = st.sidebar.text_input("SAE folder", value=os.environ.get("SAEKIT_APP_SAE", ""),
                                         key="sae_path").strip()
    else:
        sae_path = shipped[choice]
    model = st.sidebar.text_input("Model", value=os.environ.get("SAEKIT_APP_MODEL", ""), key="model_name",
                                  help="Empty: the model the SAE was trained on (cfg.json model_name).").strip()
    return page, sae_path, model


def main() -> None:
    page, sae_path, model = sidebar()
    if not sae_path:
        st.info("No SAE selected and no SAE is shipped in pretrained/saes/. Start the app with "
                "`saekit app --sae PATH` (a folder written by `saekit train --out PATH`), or type a "
                "folder in the sidebar.")
        return
    if page == "Evaluations":  # reads files only: no model needed
        if not is_hub(sae_path) and not Path(sae_path).exists():
            st.error(f"No SAE folder at {sae_path}.")
            return
        evals_page.page(sae_path)
        return
    try:
        loaded = load(sae_path, model or None)
    except SaekitError as e:
        st.error(str(e))
        return
    c = loaded.sae.cfg
    k = "" if c.selected_k is None else f", k={c.selected_k}"  # standard, jumprelu, gated: no k
    st.sidebar.caption(f"{c.sparsity} SAE, {c.d_sae} latents{k}, at {c.hook_name} of "
                       f"{model_name(loaded.model, c.model_name)}")
    {"Features": features_page.page, "Prompt lens": lens_page.page,
     "Steering": steering_page.page}[page](loaded)


main()
