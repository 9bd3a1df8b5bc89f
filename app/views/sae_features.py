"""SAE feature browser: one feature of a stored SAE at a time, read from its ``sae-features`` entry.

Find a feature by index or by density (log10 range, sorted by density or max activation), then:
its top-activating contexts with every token shaded by the feature's activation, samples from
quantile intervals of its activations, the activation histogram, the head attribution (decoder
norm per head) and, for language models, the tokens it boosts and suppresses through W_O and
the unembedding.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.errors import LensLabError
from app import charts_sae as charts
from app import sae_state
from app.state import MISSING, get_store

FEATURE = "sae_feature"


def _show_contexts(contexts, scale: float) -> None:
    if not contexts:
        st.caption("No activations.")
    for ctx in contexts:  # ctx.texts: tokens joined as the tokenizer decodes them (analysis.detokenise)
        st.markdown(f"<small>{ctx.activation:.3g}</small> " + charts.context_html(ctx.texts, ctx.acts, scale,
                                                                                  ctx.centre),
                    unsafe_allow_html=True)


store = get_store()
st.title("SAE features")
sae_state.flash()
table = sae_state.sae_table(store)
ready = table[table["features"]] if not table.empty else table
if ready.empty:
    st.info("No SAE with feature data yet. Train one and compute its feature data on the **Attention SAEs** page, "
            "or run `lenslab sae train minilm --layer 3` then `lenslab sae features minilm --layer 3`.")
    st.stop()

row = sae_state.sae_picker(store, ready, key="sae_feat_pick")
try:
    fd = sae_state.load_features(store, row["key"])
except LensLabError as exc:
    st.error(str(exc))
    st.stop()
if fd is None:
    st.warning("No feature data of this SAE with the dashboard's settings (or it was deleted): compute it on the "
               "**Attention SAEs** page, or pick another SAE.")
    st.stop()

ft = fd.table
with st.expander("Find a feature", expanded=False):
    live = ft[ft["density"] > 0]
    lo, hi = (float(np.floor(live["log10_density"].min())), float(np.ceil(live["log10_density"].max()))) \
        if len(live) else (-6.0, 0.0)
    if hi <= lo:
        hi = lo + 1.0
    rng_sel = st.slider("log10 density", min_value=lo, max_value=hi, value=(lo, hi), step=0.1, key="sae_density_range")
    order = st.radio("Sort by", ["max_act", "density", "feature"], horizontal=True, key="sae_sort")
    hits = live[(live["log10_density"] >= rng_sel[0]) & (live["log10_density"] <= rng_sel[1])]
    hits = hits.sort_values(order, ascending=order == "feature")
    st.caption(f"{len(hits)} live features in range ({int((ft['density'] == 0).sum())} dead). "
               "Type an index below to open one.")
    st.dataframe(hits.head(200), hide_index=True, placeholder=MISSING, key="sae_hits")

d_sae = fd.d_sae
held = st.session_state.get(FEATURE)
if isinstance(held, tuple) and held[0] == row["key"]:
    start = held[1]
else:  # another SAE: open on its most frequent live feature (feature 0 may be dead)
    st.session_state.pop("sae_feature_index", None)
    start = int(np.argmax(ft["density"].to_numpy())) if len(ft) else 0
raw = st.number_input(f"Feature (0..{d_sae - 1})", value=start, step=1, key="sae_feature_index",
                      help="Opens on the SAE's most frequent live feature.")
try:
    i = fd.check_feature(int(raw))
except LensLabError as exc:
    st.error(str(exc))
    st.stop()
st.session_state[FEATURE] = (row["key"], i)

info = ft.iloc[i]
if info["density"] == 0:
    st.info(f"Feature {i} is dead: it never fired on the tokens the feature data was computed on. "
            "Pick a live one under **Find a feature**.")
c = st.columns(4)
c[0].metric("density", f"{info['density']:.3g}")
c[1].metric("max activation", f"{info['max_act']:.3g}")
c[2].metric("mean activation", f"{info['mean_act']:.3g}")
if "top_head" in ft.columns:
    c[3].metric("top head", f"H{int(info['top_head'])} ({info['top_head_weight']:.0%})")

left, right = st.columns([3, 2])
with left:
    st.subheader("Top activations")
    _show_contexts(fd.contexts(i), float(info["max_act"]))
    n_int = fd.quantile_rows.shape[1]
    with st.expander(f"Quantile-interval samples ({n_int} equal-count intervals of the nonzero activations)"):
        for j in reversed(range(n_int)):
            lo_j, hi_j = fd.quantile_edges[i, j], fd.quantile_edges[i, j + 1]
            st.markdown(f"**interval {j}** ({lo_j:.3g} – {hi_j:.3g})")
            _show_contexts(fd.contexts(i, j), float(info["max_act"]))
with right:
    st.plotly_chart(charts.activation_histogram(fd.hist_counts[i], fd.hist_edges[i], i), key="sae_hist")
    if fd.head_attribution is not None:
        st.plotly_chart(charts.head_bars(fd.head_attribution[i], i, row.get("layer")), key="sae_heads")
    logits = fd.logit_table(i)
    if logits is not None:
        st.plotly_chart(charts.logit_bars(logits, i), key="sae_logits")
        st.caption(f"Unembedding: {fd.meta.get('unembedding', '?')}. Direct path only (no attention or MLPs "
                   "after this layer).")
