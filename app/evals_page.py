"""Evaluations: the reports ``saekit eval`` and ``saekit eval-ioi`` write beside the SAE."""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st
import streamlit.components.v1 as components

REPORTS = (("Evaluation", "eval", "saekit eval --sae {path}"),
           ("IOI evaluation", "ioi_eval", "saekit eval-ioi --sae {path}"))


def page(sae_path: str) -> None:
    st.header("Evaluations")
    folder = Path(sae_path)
    for title, stem, command in REPORTS:
        st.subheader(title)
        js, page_html = folder / f"{stem}.json", folder / f"{stem}.html"
        if not js.is_file() and not page_html.is_file():
            st.info(f"No {stem}.json or {stem}.html beside this SAE. Make them with "
                    f"`{command.format(path=sae_path)}`.")
            continue
        if page_html.is_file():
            components.html(page_html.read_text(encoding="utf-8", errors="replace"), height=700, scrolling=True)
        if js.is_file():
            try:
                st.json(json.loads(js.read_text()), expanded=not page_html.is_file())
            except json.JSONDecodeError as e:
                st.error(f"{js} is not valid JSON ({e}); rerun `{command.format(path=sae_path)}`.")
