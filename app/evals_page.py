"""Evaluations: the results ``saekit eval`` and ``saekit eval-ioi`` wrote beside the SAE, drawn
with the same figures as their HTML reports (``saekit.evals.report``)."""

from __future__ import annotations

import json

import streamlit as st

from saekit import formats
from saekit.evals.report import eval_parts, ioi_parts, summary_row
from saekit.formats import results_folder

REPORTS = (("Evaluation", "eval", "saekit eval --sae {path}"),
           ("IOI evaluation", "ioi_eval", "saekit eval-ioi --sae {path}"))


def page(sae_path: str) -> None:
    st.header("Evaluations")
    folder = results_folder(sae_path)  # the SAE's folder; runs/hf/... for hf:// paths
    for (title, stem, command), parts in zip(REPORTS, (eval_parts, ioi_parts)):
        st.subheader(title)
        js = folder / f"{stem}.json"
        if not js.is_file():
            st.info(f"No {stem}.json beside this SAE. Make it with `{command.format(path=sae_path)}`.")
            continue
        try:
            result = json.loads(js.read_text())
            figures = parts(result)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            st.error(f"{js} is not a readable {stem}.json ({type(e).__name__}: {e}); rerun "
                     f"`{command.format(path=sae_path)}`.")
            continue
        st.caption(f"The full report is {folder / (stem + '.html')} (opens offline in a browser).")
        for part in figures:
            if isinstance(part, str):
                st.html(part)
            else:
                st.plotly_chart(part, use_container_width=True)

    shipped = formats.shipped_saes()
    if shipped:
        st.subheader("The shipped SAEs side by side")
        st.caption("From each folder's eval.json and ioi_eval.json (L3.END) in pretrained/saes/; "
                   "`python benchmarks/shipped_saes.py` prints the same table.")
        st.dataframe([summary_row(f) for f in shipped], key="shipped_table", hide_index=True)
