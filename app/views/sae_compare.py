"""SAE comparison page: Pareto plots across stored SAEs.

Two sections, both read from the store through ``app.api``:

- **SAEs of a model**: pick a model and a site (layer); L0 against NMSE, loss recovered and KL recovered, one
  marker per evaluated SAE, coloured by architecture, with the Pareto frontier (``api.sae_list``). At a
  block's ``mlp_out`` site the stored transcoders of that block (``api.sae_transcoders``: they read the
  MLP input and predict the same MLP output) are drawn beside the SAEs as diamonds, and listed. Below, the
  stored sparse-probing runs of those SAEs (``api.probe_rows``): L0 against the k-sparse probe accuracy,
  and the table beside the raw-activation probe.
- **Ground truth**: SAEs trained on synthetic activations with a known dictionary
  (``api.groundtruth_rows``): L0 against NMSE and against MCC / absorption, and the table. The button
  scores every architecture on the default synthetic setting (``api.sae_groundtruth_table``).
"""

from __future__ import annotations

import streamlit as st

from app import api
from app import charts_sae_compare as charts
from app.state import MISSING, get_store, run_with_st_progress

TC_COLUMNS = ["name", "kind", "architecture", "masked", "l0", "nmse", "nmse_mask", "nmse_other", "loss_recovered"]
GT_COLUMNS = ["architecture", "d_sae", "k", "l1_coefficient", "l0_coefficient", "l0", "nmse", "mcc", "mean_max_cosine",
              "precision", "recall", "absorption", "parent_split_fraction", "shrinkage", "dead_fraction"]

SITE_COLUMNS = ["name", "architecture", "l0", "nmse", "explained_variance_saelens", "loss_recovered", "kl_recovered",
                "dead_fraction"]

store = get_store()
st.title("Compare SAEs")
st.caption("Pareto plots across the stored SAEs: sparsity (L0) against reconstruction, loss recovered and, on "
           "synthetic data, recovery of the true features. The dashed line is the Pareto frontier.")
if msg := st.session_state.pop("sae_compare_flash", None):
    st.success(msg)

st.header("SAEs of a model")
saes = api.sae_list(store=store)
evaluated = saes[saes["l0"].notna()] if not saes.empty else saes
tcs = api.sae_transcoders(store=store)
if evaluated.empty and tcs.empty:
    st.info("No evaluated SAE or stored transcoder yet. Train and evaluate SAEs on **Attention SAEs**, or run "
            "`lenslab sae train minilm --layer 3` then `lenslab sae eval minilm --layer 3`; "
            "`lenslab sae transcoder minilm --layer 3` stores a transcoder of that block's MLP.")
else:
    c1, c2 = st.columns(2)
    models = sorted({str(m) for t in (evaluated, tcs) if not t.empty for m in t["model"]})
    model = c1.selectbox("Model", models, key="cmp_model")
    mine = evaluated[evaluated["model"].astype(str) == model] if not evaluated.empty else saes.iloc[0:0]
    if "site" not in mine.columns:  # a listing without sites: every SAE reads hook_z
        mine = mine.assign(site="hook_z")
    my_tcs = tcs[tcs["model"].astype(str) == model]
    places = sorted({(int(L), str(s)) for L, s in zip(mine["layer"], mine["site"])}
                    | {(int(L), "mlp_out") for L in my_tcs["layer"]})
    layer, at = c2.selectbox("Site (layer)", places, key="cmp_layer",
                             format_func=lambda p: f"blocks.{p[0]}.attn.hook_z" if p[1] == "hook_z"
                             else f"layer {p[0]} {p[1]}")
    site = mine[(mine["layer"] == layer) & (mine["site"] == at)]
    here = my_tcs[my_tcs["layer"] == layer] if at == "mlp_out" else my_tcs.iloc[0:0]
    st.caption(f"{len(site)} evaluated SAE(s) of {model} at layer {layer} ({at})."
               + (f" Diamonds: {len(here)} transcoder(s) of block {layer}, which read the MLP input and predict "
                  "this MLP output (NMSE against it, loss recovered with it replaced); the dashed frontier is the "
                  "SAEs'." if len(here) else "")
               + (f" Transcoders of {model} are stored at block(s) {sorted({int(L) for L in my_tcs['layer']})}: "
                  "pick that layer's mlp_out site to see them." if here.empty and not my_tcs.empty else ""))
    p1, p2 = st.columns(2)
    p1.plotly_chart(charts.pareto_scatter(site, "l0", "nmse", title="L0 vs NMSE", transcoders=here), key="cmp_nmse")
    if site["loss_recovered"].notna().any() or here["loss_recovered"].notna().any():
        p2.plotly_chart(charts.pareto_scatter(site, "l0", "loss_recovered", minimise_y=False,
                                              title="L0 vs loss recovered", transcoders=here), key="cmp_loss")
    else:
        p2.caption("L0 vs loss recovered: not measured for these SAEs (evaluated with --no-loss; "
                   "`lenslab sae eval SOURCE --layer L --sae KEY` measures it).")
    if "kl_recovered" in site.columns and site["kl_recovered"].notna().any():
        st.plotly_chart(charts.pareto_scatter(site, "l0", "kl_recovered", minimise_y=False,
                                              title="L0 vs KL recovered"), key="cmp_kl")
    st.dataframe(site[[c for c in SITE_COLUMNS if c in site.columns]], hide_index=True, key="cmp_table",
                 placeholder=MISSING)
    if not here.empty:
        st.subheader(f"Transcoders of block {layer}")
        st.dataframe(here[TC_COLUMNS], hide_index=True, key="cmp_transcoders", placeholder=MISSING)
        st.caption("NMSE against the MLP output on held-out text; NMSE [MASK] / other (masked LMs): at the masked / "
                   "other positions of masked held-out text; masked: trained on text with 15% of the tokens "
                   "replaced by [MASK] (`lenslab sae transcoders` lists every stored transcoder).")

    st.subheader("Sparse probing")
    probes = api.probe_rows(store=store)
    probed = (site[["key", "name", "architecture", "l0"]].merge(probes, left_on="key", right_on="sae_key",
                                                                  suffixes=("", "_probe"))
              if not probes.empty else probes)
    if probed.empty:
        st.caption("No probing run for these SAEs yet: `lenslab sae probe SOURCE --layer L --task package` (or "
                   "`--task code`) fits k-sparse probes on an SAE's latents and a probe on the raw activations.")
    else:
        tasks = sorted(probed["task"].astype(str).unique())
        task = st.selectbox("Probing task", tasks, key="cmp_probe_task") if len(tasks) > 1 else tasks[0]
        mine_p = probed[probed["task"] == task]
        ks = sorted((c for c in mine_p.columns if c.startswith("sae k=")), key=lambda c: int(c.split("=")[1]))
        q1, q2 = st.columns(2)
        for col, k_col in zip((q1, q2), (ks[0], ks[-1]) if len(ks) > 1 else ks):
            col.plotly_chart(charts.pareto_scatter(mine_p, "l0", k_col, minimise_y=False,
                                                   title=f"L0 vs probe accuracy ({k_col.removeprefix('sae ')})"),
                             key=f"cmp_probe_{k_col}")
        st.dataframe(mine_p[["name", "architecture", "l0", *ks, "raw", "n_texts"]], hide_index=True,
                     key="cmp_probe_table", placeholder=MISSING)
        st.caption(f"Task {task!r}: mean accuracy over its one-vs-rest tasks on held-out texts; 'raw' is a logistic "
                   "probe on all of the raw activations (sae/probing.py).")

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
