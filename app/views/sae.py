"""Attention SAEs page: the SAEs in the store with their evaluation metrics.

One row per stored SAE (source, layer, architecture, width, L0, NMSE, explained variance, loss
recovered, dead / dense fractions); pick one for its metrics, its feature-density histogram and
the polysemantic-head table. The form trains an SAE (``app.api.sae_train``), the buttons
evaluate it (``sae_eval``) and compute its feature data (``sae_features``), each under a progress
bar. Everything shown is read from the store.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import api
from app import charts_sae as charts
from app import sae_state
from app.state import MISSING, get_store

METRIC_COLUMNS = ["name", "l0", "nmse", "explained_variance_saelens", "explained_variance_sklearn", "loss_recovered",
                  "dead_fraction", "dense_fraction", "n_train_tokens", "features"]

store = get_store()
st.title("Attention SAEs")
st.caption("Sparse autoencoders on attention outputs (hook_z, all heads concatenated; Kissane et al. 2024). "
           "Browse features on **SAE features**, run a prompt on **SAE prompt**.")
sae_state.flash()

table = sae_state.sae_table(store)
with st.expander("Train an SAE", expanded=table.empty):
    with st.form("sae_train_form"):
        c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
        spec = c1.text_input("Source", value="minilm", key="sae_source",
                             help="minilm, bilinear-lm, tiny-mixtral, or a model directory on this machine.")
        layer = c2.number_input("Layer", min_value=0, value=0, step=1, key="sae_layer")
        arch = c3.selectbox("Architecture", ["topk", "relu"], key="sae_arch")
        expansion = c4.number_input("Width × d_in", min_value=1, value=4, step=1, key="sae_expansion")
        c5, c6, c7, c8 = st.columns(4)
        k = c5.number_input("k (topk) ", min_value=1, value=16, step=1, key="sae_k")
        l1 = c6.number_input("L1 coefficient (relu)", min_value=0.0, value=1.0, key="sae_l1", format="%.3g")
        n_tokens = c7.number_input("Training tokens", min_value=1000, value=500_000, step=10_000, key="sae_tokens")
        per_package = c8.number_input("Docstrings per package", min_value=1, value=100, step=10, key="sae_docs",
                                      help="Training texts: this many docstrings of each package of the corpus.")
        start_over = st.checkbox("Start over", value=False, key="sae_start_over",
                                 help="An interrupted run with the same settings resumes from its last checkpoint "
                                      "(every 500 steps); tick to train from step 0 instead.")
        submitted = st.form_submit_button("Train", type="primary")
    if submitted and not spec.strip():
        st.error("The source is empty; type minilm or a path to a model.")
    elif submitted:  # sae_state.train refuses a path outside the dashboard's allowed roots
        extra = {"k": int(k)} if arch == "topk" else {"l1_coefficient": float(l1)}
        trained = sae_state.run_with_progress(f"Training an SAE on {spec.strip()} layer {int(layer)}",
                                              sae_state.train, spec.strip(), int(layer), architecture=arch,
                                              expansion=int(expansion), n_tokens=int(n_tokens),
                                              per_package=int(per_package), store=store, resume=not start_over,
                                              **extra)
        if trained is not None:
            sae_state.choose_sae(trained.key)
            st.rerun()

if table.empty:
    st.info("No SAEs in the store yet. Press **Train** above, or run "
            "`lenslab sae train minilm --layer 3` in a terminal.")
    st.stop()

show = table[[c for c in METRIC_COLUMNS if c in table.columns]].assign(
    name=[sae_state.sae_label(n, k) for n, k in zip(table["name"], table["key"])])
numeric = [c for c in show.columns if c not in ("name", "features")]
show[numeric] = show[numeric].apply(pd.to_numeric, errors="coerce")  # a None (not measured) reads as MISSING
st.dataframe(show, hide_index=True, placeholder=MISSING, key="sae_table",
             column_config={"explained_variance_saelens": st.column_config.NumberColumn(
                                "EV SAELens", format="%.3f", help="1 - NMSE: SAELens's explained_variance"),
                            "explained_variance_sklearn": st.column_config.NumberColumn(
                                "EV sklearn", format="%.3f", help="sklearn's variance-weighted explained variance "
                                                                  "(ignores a constant offset of the reconstruction)"),
                            "nmse": st.column_config.NumberColumn(format="%.3f"),
                            "loss_recovered": st.column_config.NumberColumn(format="%.3f")})

row = sae_state.sae_picker(store, table, key="sae_pick")
key = row["key"]
evaluation = sae_state.load_evaluation(store, key)
features = sae_state.load_features(store, key)

b1, b2, _ = st.columns([1, 1, 3])
if evaluation is None and b1.button("Evaluate", key="sae_eval_button", type="primary"):
    if sae_state.run_with_progress("Evaluating the SAE", sae_state.evaluate, key, row["source"],
                                   store=store) is not None:
        st.rerun()
if features is None and b2.button("Compute feature data", key="sae_features_button"):
    if sae_state.run_with_progress("Computing feature data", sae_state.features, key, row["source"],
                                   store=store) is not None:
        st.rerun()

st.subheader(sae_state.sae_label(row["name"], key))
if evaluation is None:
    st.info(f"Not evaluated yet: press **Evaluate** or run `lenslab sae eval {row['source']} --layer {row['layer']}`.")
else:
    m = evaluation.metrics
    cols = st.columns(7)
    for col, (name, label, fmt) in zip(cols, [("l0", "L0", ".1f"), ("nmse", "NMSE", ".3f"),
                                              ("explained_variance_saelens", "EV (SAELens)", ".3f"),
                                              ("explained_variance_sklearn", "EV (sklearn)", ".3f"),
                                              ("loss_recovered", "loss recovered", ".3f"),
                                              ("dead_fraction", "dead", ".1%"), ("dense_fraction", "dense", ".1%")]):
        v = m.get(name)
        col.metric(label, MISSING if v is None or not np.isfinite(v) else format(v, fmt))
    st.caption(evaluation.caption)
    st.plotly_chart(charts.density_histogram(evaluation.density, "Feature density (evaluation tokens)"),
                    key="sae_density")

if features is None:
    st.info("No feature data yet: press **Compute feature data** or run "
            f"`lenslab sae features {row['source']} --layer {row['layer']}`.")
else:
    st.subheader("Polysemantic heads")
    poly = api.sae_polysemantic(key, store=store, features=features)
    st.caption(f"{poly.n_polysemantic} of {poly.n_counted} heads with ≥ 2 top features carry ≥ 2 unrelated feature "
               "families. Rule: a feature belongs to its top head when that head holds ≥ "
               f"{poly.settings['min_weight']:.0%} of its decoder norm; a head's top {poly.settings['top_features']} "
               f"features are related when their top-context token sets overlap (Jaccard ≥ "
               f"{poly.settings['min_jaccard']}) or their decoder rows align "
               f"(cosine ≥ {poly.settings['min_cosine']}); "
               "families are the connected groups.")
    st.dataframe(poly.table, hide_index=True, placeholder=MISSING, key="sae_poly")
