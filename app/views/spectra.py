"""Conditioning & spectra page: per-layer κ and alpha heatmaps, one matrix's ESD, the table.

Reads the stored spectra of the chosen model; when there are none, a button runs
``app.api.analyze`` (the source spec is read as given) with a progress bar.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.errors import LensLabError
from app import charts
from app.state import MISSING, analyze_with_progress, get_store, has_spectra, load_spectra, model_picker

TABLE_COLUMNS = ["matrix", "layer", "module_type", "shape", "dtype", "status", "kappa", "log10_kappa", "alpha",
                 "alpha_sigma", "ks_distance", "stable_rank", "effective_rank", "numerical_rank", "sigma_max",
                 "sigma_min", "mp_edge", "n_spikes", "welore_fraction", "low_rank", "route"]

store = get_store()
st.title("Conditioning & spectra")
if (model := model_picker(store, key="spectra_model", prefer=lambda m: has_spectra(store, m.fingerprint))) is None:
    st.stop()

try:
    ws = load_spectra(store, model.fingerprint)
except LensLabError as exc:  # a corrupt entry: say so and offer to recompute
    st.error(str(exc))
    ws = None

if ws is None:
    st.info(f"No spectra stored for {model.label} yet.")
    spec = st.text_input("Source to analyse", value=model.label, key="spectra_source",
                         help="The bundled name or the path the model was analysed from.")
    if st.button("Compute spectra", type="primary"):
        done = analyze_with_progress(spec.strip(), store, refresh=True)
        if done is not None:
            st.rerun()
    st.stop()

table = ws.table
n_ok = int((table["status"] == "ok").sum())
c1, c2, c3, c4 = st.columns(4)
c1.metric("matrices", len(table))
c2.metric("1-D tensors skipped", len(ws.skipped))
finite_kappa = table["kappa"][np.isfinite(table["kappa"].astype(float))]
c3.metric("median κ", f"{finite_kappa.median():.3g}" if len(finite_kappa) else "–")
c4.metric("median α", f"{table['alpha'].median():.3g}" if table["alpha"].notna().any() else "–")
if n_ok < len(table):
    st.warning(f"{len(table) - n_ok} matrices hold NaN/Inf values; their metrics are blank (see the status column).")

left, right = st.columns(2)
left.plotly_chart(charts.heatmap(table, "log10_kappa"), key="heat_kappa")
right.plotly_chart(charts.heatmap(table, "alpha"), key="heat_alpha")
outside = charts.outside_blocks(table)
if len(outside) and len(outside) < len(table):
    st.caption(f"Not in the heatmaps ({len(outside)} tensors outside the numbered blocks, listed in the table): "
               + ", ".join(f"`{m}`" for m in outside["matrix"]))

st.subheader("Spectrum of one matrix")
labels = [m for m in table["matrix"] if m in ws.singular_values]
if labels:
    # default: the first matrix inside a block with a power-law fit, else the first fitted one
    fitted = table[table["matrix"].isin(labels) & np.isfinite(table["alpha"].astype(float))]
    preferred = fitted[fitted["layer"] >= 0] if (fitted["layer"] >= 0).any() else fitted
    default = labels.index(preferred["matrix"].iloc[0]) if len(preferred) else 0
    matrix = st.selectbox("Matrix", labels, index=default, key="spectra_matrix")
    row = table.loc[table["matrix"] == matrix].iloc[0]
    sv = ws.singular_values[matrix]
    esd_col, info_col = st.columns([3, 1])
    esd_col.plotly_chart(charts.esd_loglog(sv, row), key="esd")
    info_col.markdown(
        f"**Stored metrics**  \nshape {row['shape']} · {row['dtype']}  \nκ = {row['kappa']:.4g}  \n"
        f"α = {row['alpha']:.3g} ± {row['alpha_sigma']:.2g} (KS D = {row['ks_distance']:.3f}, "
        f"{int(row['n_tail'])} eigenvalues ≥ xmin = {row['xmin']:.3g})  \n"
        f"MP edge λ+ = {row['mp_edge']:.3g}, {int(row['n_spikes'])} spikes above it  \n"
        f"stable rank {row['stable_rank']:.3g} · effective rank {row['effective_rank']:.4g}")
    info_col.caption("WeightWatcher's rule of thumb: α < 2 over-trained, α > 6 under-trained.")
    with st.expander("Singular values by rank"):
        st.plotly_chart(charts.singular_value_curve(sv, row), key="sv_curve")
else:
    st.info("No matrix of this model has finite singular values to plot.")

st.subheader("All matrices")
st.caption("Click a column header to sort.")
st.dataframe(table[[c for c in TABLE_COLUMNS if c in table.columns]], hide_index=True, placeholder=MISSING,
             key="spectra_table",
             column_config={"welore_fraction": st.column_config.NumberColumn("WeLore fraction", format="%.2f")})

with st.expander(f"Skipped 1-D tensors ({len(ws.skipped)})"):
    if ws.skipped:
        st.dataframe([{"tensor": s["tensor"], "shape": str(tuple(s["shape"])),
                       "reason": s["reason"].split(";")[0]} for s in ws.skipped], hide_index=True, placeholder=MISSING)
    else:
        st.write("None: every floating-point tensor is a matrix.")
