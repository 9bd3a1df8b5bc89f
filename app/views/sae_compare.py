"""SAE comparison page: Pareto plots across stored SAEs.

Two sections, both read from the store through ``app.api``:

- **SAEs of a model**: pick a model and a site (layer); L0 against NMSE and against loss recovered, one
  marker per evaluated SAE, coloured by architecture, with the Pareto frontier (``api.sae_list``).
- **Ground truth**: SAEs trained on synthetic activations with a known dictionary
  (``api.groundtruth_rows``): L0 against NMSE and against MCC / absorption, and the table. The button
  scores every architecture on the default synthetic setting (``api.sae_groundtruth_table``).
"""

from __future__ import annotations

import streamlit as st

from app import api
from app import charts_sae_compare as charts
from app.state import MISSING, get_store, run_with_st_progress

GT_COLUMNS = ["architecture", "d_sae", "k", "l1_coefficient", "l0_coefficient", "l0", "nmse", "mcc", "mean_max_cosine",
              "precision", "recall", "absorption", "parent_split_fraction", "shrinkage", "dead_fraction"]

store = get_store()
st.title("Compare SAEs")
st.caption("Pareto plots across the stored SAEs: sparsity (L0) against reconstruction, loss recovered and, on "
           "synthetic data, recovery of the true features. The dashed line is the Pareto frontier.")
if msg := st.session_state.pop("sae_compare_flash", None):
    st.success(msg)

st.header("SAEs of a model")
saes = api.sae_list(store=store)
evaluated = saes[saes["l0"].notna()] if not saes.empty else saes
if evaluated.empty:
    st.info("No evaluated SAE yet. Train and evaluate some on **Attention SAEs**, or run "
            "`lenslab sae train minilm --layer 3` then `lenslab sae eval minilm --layer 3`.")
else:
    c1, c2 = st.columns(2)
    model = c1.selectbox("Model", sorted(evaluated["model"].astype(str).unique()), key="cmp_model")
    mine = evaluated[evaluated["model"].astype(str) == model]
    if "site" not in mine.columns:  # a listing without sites: every SAE reads hook_z
        mine = mine.assign(site="hook_z")
    places = sorted({(int(L), str(s)) for L, s in zip(mine["layer"], mine["site"])})
    layer, at = c2.selectbox("Site (layer)", places, key="cmp_layer",
                             format_func=lambda p: f"blocks.{p[0]}.attn.hook_z" if p[1] == "hook_z"
                             else f"layer {p[0]} {p[1]}")
    site = mine[(mine["layer"] == layer) & (mine["site"] == at)]
    st.caption(f"{len(site)} evaluated SAE(s) of {model} at layer {layer} ({at}).")
    p1, p2 = st.columns(2)
    p1.plotly_chart(charts.pareto_scatter(site, "l0", "nmse", title="L0 vs NMSE"), key="cmp_nmse")
    if site["loss_recovered"].notna().any():
        p2.plotly_chart(charts.pareto_scatter(site, "l0", "loss_recovered", minimise_y=False,
                                              title="L0 vs loss recovered"), key="cmp_loss")
    else:
        p2.caption("L0 vs loss recovered: not measured for these SAEs (evaluated with --no-loss; "
                   "`lenslab sae eval SOURCE --layer L --sae KEY` measures it).")
    st.dataframe(site[["name", "architecture", "l0", "nmse", "explained_variance_saelens", "loss_recovered",
                       "dead_fraction"]], hide_index=True, key="cmp_table", placeholder=MISSING)

st.header("Ground truth (synthetic activations)")
if st.button("Score every architecture on the default synthetic setting", key="cmp_score",
             help="Trains one SAE per architecture on 100k synthetic samples (256 features in 64 dimensions) and "
                  "scores it against the true dictionary; a few minutes per architecture on a CPU."):
    out = run_with_st_progress("Scoring every architecture", api.sae_groundtruth_table, store=store,
                               flash_key="sae_compare_flash")
    if out is not None:
        st.rerun()
gt = api.groundtruth_rows(store=store)
if gt.empty:
    st.info("No ground-truth runs yet. Press the button above or run `lenslab sae groundtruth`.")
    st.stop()
settings = list(dict.fromkeys(gt["setting"]))
setting = st.selectbox("Synthetic setting", settings, key="cmp_setting") if len(settings) > 1 else settings[0]
runs = gt[gt["setting"] == setting].assign(name=lambda t: t["architecture"].astype(str))
g1, g2, g3 = st.columns(3)
g1.plotly_chart(charts.pareto_scatter(runs, "l0", "nmse", title="L0 vs NMSE"), key="gt_nmse")
g2.plotly_chart(charts.pareto_scatter(runs, "l0", "mcc", minimise_y=False, title="L0 vs MCC"), key="gt_mcc")
g3.plotly_chart(charts.pareto_scatter(runs, "l0", "absorption", title="L0 vs absorption"), key="gt_absorption")
st.dataframe(runs[[c for c in GT_COLUMNS if c in runs.columns]], hide_index=True, key="gt_table", placeholder=MISSING)
st.caption("MCC: Hungarian-matched |cos| between decoder rows and true features; precision/recall at |cos| >= 0.9; "
           "absorption: the parent latent is off while other latents write at least half of the parent's "
           "coefficient along its direction; shrinkage: "
           "latent magnitude / true coefficient (sae/ground_truth.py).")
