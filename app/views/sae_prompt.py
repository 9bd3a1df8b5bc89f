"""SAE prompt view: type a prompt, see which features of a stored SAE fire on each token and,
for one feature, its direct feature attribution by head (z_h · W_enc[h slice, i]) per token.

``Run`` calls ``app.api.sae_prompt`` (boots the model once per server, runs the prompt, encodes
hook_z); the result is kept in the session, not in the store. The page runs the default prompt by
itself the first time an SAE is shown, so it opens on a result.
"""

from __future__ import annotations

import streamlit as st

from analysis.errors import LensLabError
from app import charts_sae as charts
from app import sae_state
from app.state import MISSING, get_store

RESULT = "sae_prompt_result"
N_SHOWN = 20  # features in the heatmap: the ones with the largest activation on the prompt

store = get_store()
st.title("SAE prompt")
sae_state.flash()
table = sae_state.sae_table(store)
if table.empty:
    st.info("No SAEs in the store yet. Train one on the **Attention SAEs** page or run "
            "`lenslab sae train minilm --layer 3`.")
    st.stop()

row = sae_state.sae_picker(store, table, key="sae_prompt_pick")
with st.form("sae_prompt_form"):
    text = st.text_area("Prompt", value="Return a new array of given shape and type, filled with zeros.",
                        key="sae_prompt_text")
    submitted = st.form_submit_button("Run", type="primary")
held = st.session_state.get(RESULT)
first_view = held is None or held[0] != row["key"]
if submitted or first_view:
    if not text.strip():
        st.error("The prompt is empty; type some text.")
    else:
        res = sae_state.run_with_progress("Running the prompt", sae_state.prompt, row["key"], row["source"], text,
                                          store=store)
        if res is not None:
            st.session_state[RESULT] = (row["key"], res)
            st.rerun()  # the success message shows with the result, not one action later

held = st.session_state.get(RESULT)
if held is None or held[0] != row["key"]:
    st.info("Type a prompt and press **Run**.")
    st.stop()
res = held[1]

fired = res.top_features(N_SHOWN)
st.caption(f"{len(res.tokens)} tokens; {int((res.acts > 0).any(axis=0).sum())} features fired; mean L0 "
           f"{(res.acts > 0).sum(axis=1).mean():.1f} per token.")
if not fired:
    st.warning("No feature fired on this prompt.")
    st.stop()
st.plotly_chart(charts.prompt_heatmap(res.acts[:, fired], res.tokens, fired), key="sae_prompt_heat")
st.dataframe(res.token_table(5), hide_index=True, placeholder=MISSING, key="sae_prompt_tokens")

feature = st.selectbox("Feature for the DFA", fired, key="sae_prompt_feature",
                       format_func=lambda f: f"f{f} (max {res.acts[:, f].max():.3g})")
try:
    dfa = res.dfa(feature)
except LensLabError as exc:  # an SAE on another site than hook_z: no heads to attribute to
    st.caption(str(exc))
    st.stop()
st.plotly_chart(charts.dfa_heatmap(dfa, res.tokens, feature), key="sae_prompt_dfa")
st.caption("Summed over heads, a row is the feature's encoder pre-activation without the bias terms "
           "(pre − b_enc + b_dec·W_enc).")
