"""Steering: a prompt, any number of (latent, method, value, positions) rows; the steered and
unsteered continuations side by side and, for an IOI prompt, the logit difference before and
after."""

from __future__ import annotations

import streamlit as st

from saekit.app.resources import Loaded, model_lock
from saekit.errors import SaekitError
from saekit.steering import METHODS, generate, ioi_logit_diff, make

EXAMPLE = "When Mary and John went to the store, John gave a drink to"
METHOD_HELP = ("add: value × the decoder direction; clamp: set the latent to value; ablate: set it to 0; "
               "cap: bound the projection on its direction at value")


def _rows(ld: Loaded) -> list[tuple[int, str, float, str]]:
    n = st.number_input("Interventions", min_value=0, max_value=8, value=1, step=1, key="steer_n")
    rows = []
    for i in range(int(n)):
        c = st.columns([2, 2, 2, 2])
        latent = c[0].number_input("Latent", min_value=0, step=1, key=f"steer_latent_{i}")
        method = c[1].selectbox("Method", list(METHODS), key=f"steer_method_{i}", help=METHOD_HELP)
        value = c[2].number_input("Value", value=10.0, step=1.0, key=f"steer_value_{i}")
        where = c[3].selectbox("Positions", ["all", "last"], key=f"steer_pos_{i}")
        rows.append((int(latent), method, float(value), where))
    return rows


def page(ld: Loaded) -> None:
    st.header("Steering")
    prompt = st.text_area("Prompt", value=EXAMPLE, key="steer_prompt", height=80)
    rows = _rows(ld)
    c1, c2 = st.columns(2)
    max_new = c1.slider("New tokens", 1, 60, 20, key="steer_tokens")
    temperature = c2.number_input("Temperature (0: greedy)", min_value=0.0, max_value=5.0, value=0.0,
                                  step=0.1, key="steer_temp")
    if not st.button("Generate", key="steer_go", type="primary"):
        return
    if not prompt.strip():
        st.warning("The prompt is empty: type some text for the model to continue.")
        return
    try:
        interventions = [make(m, ld.sae, latent, value, where) for latent, m, value, where in rows]
        with model_lock():
            g = generate(ld.model, prompt, interventions, max_new_tokens=max_new, temperature=temperature)
            diff = ioi_logit_diff(ld.model, prompt, interventions)
    except SaekitError as e:
        st.error(str(e))
        return
    left, right = st.columns(2)
    left.markdown("**Unsteered**")
    left.code(prompt + g.unsteered, language=None, wrap_lines=True)
    right.markdown("**Steered**")
    right.code(prompt + g.steered, language=None, wrap_lines=True)
    if diff is not None:
        st.metric(f"IOI logit difference, logit({diff.io}) − logit({diff.s})", f"{diff.after:.2f}",
                  delta=f"{diff.after - diff.before:+.2f} from {diff.before:.2f} unsteered")
    else:
        st.caption("Not an IOI prompt (two names, one said twice), so no logit difference is shown.")
