"""Attention circuits page: a layer x head heatmap of one metric of the QK or OV circuits of a stored model.

Reads the circuit spectra stored for the picked model (``app.api.stored_circuits`` / ``load_circuits``);
the form runs ``app.api.circuits`` on a typed source (refused outside the allowed roots) with a progress bar.
"""

from __future__ import annotations

import streamlit as st

from analysis.errors import LensLabError
from app import api
from app import charts_circuits as charts
from app.allowed_paths import check_source
from app.state import MISSING, get_store, model_picker, remember_model, run_with_st_progress

FLASH = "circuits_flash"
PICK = "circuits_model"
PENDING = "circuits_pending_model"  # fingerprint to select on the next run (set after a compute)
METRICS = {"kappa": "κ = s_max / s_min", "stable_rank": "stable rank Σs²/s_max²",
           "effective_rank": "effective rank exp(H(s/Σs))", "s_max": "s_max (spectral norm)"}
EMPTY = ("No models in the store yet. Run `lenslab circuits minilm` in a terminal, or compute them with the form "
         "below.")


@st.cache_data(show_spinner="Loading circuit spectra from the store…", max_entries=16)
def _load(store_root: str, key: str):
    return api.load_circuits(key, store_root)


def _compute(spec: str, **kwargs):
    """``api.circuits`` on a typed source, refused outside the dashboard's allowed roots."""
    return api.circuits(check_source(spec), **kwargs)


store = get_store()
st.title("Attention circuits")
st.caption("Singular values of every head's QK circuit W_Q W_Kᵀ (how queries score keys) and OV circuit W_V W_O "
           "(what the head writes), d_model x d_model of rank ≤ d_head, computed exactly from their factors in "
           "float64. κ is s_max / s_min over the d_head nonzero-rank values (inf: a rank-deficient head).")
if msg := st.session_state.pop(FLASH, None):
    st.success(msg)
if pending := st.session_state.pop(PENDING, None):  # open on the model just computed
    remember_model(pending)
    st.session_state.pop(PICK, None)
model = model_picker(store, key=PICK, empty=EMPTY,  # no choice yet: the newest model with circuit spectra
                     prefer=lambda m: bool(api.stored_circuits(m.fingerprint, store)))
entries = api.stored_circuits(model.fingerprint, store) if model is not None else []

with st.expander("Compute circuit spectra", expanded=not entries):
    spec = st.text_input("Source", value=model.label if model is not None else "minilm", key="circuits_source",
                         help="minilm or a Hugging Face model directory on this machine (inside the allowed roots)")
    if st.button("Compute circuits", type="primary", key="circuits_compute") and spec.strip():
        done = run_with_st_progress(f"circuits of {spec.strip()}", _compute, spec.strip(), store=store,
                                    flash_key=FLASH)
        if done is not None:
            st.session_state[PENDING] = done.meta.get("fingerprint")
            st.rerun()

if model is None:
    st.stop()
if not entries:
    st.info(f"No circuit spectra stored for {model.label} yet. Run `lenslab circuits {model.label}` in a terminal, "
            "or press **Compute circuits** above.")
    st.stop()
try:
    cs = _load(str(store.root), entries[0].key)
except LensLabError as exc:  # a corrupt entry: say so; Compute recomputes it
    st.error(str(exc))
    st.stop()

m = cs.meta
c1, c2, c3, c4 = st.columns(4)
c1.metric("attention layers", len(m["layers"]))
c2.metric("query heads", m["n_heads"], help=f"{m['n_kv_heads']} key/value heads")
c3.metric("d_model", m["d_model"])
c4.metric("d_head", m["d_head"])
left, right = st.columns(2)
circuit = left.radio("Circuit", ["QK", "OV"], horizontal=True, key="circuits_circuit",
                     help="QK = W_Q W_Kᵀ (attention scores), OV = W_V W_O (what is written to the residual stream)")
metric = right.selectbox("Metric", list(METRICS), format_func=METRICS.get, key="circuits_metric")
st.plotly_chart(charts.head_heatmap(cs.grid(metric, circuit), metric, circuit), key="circuits_heatmap")

st.subheader(f"{circuit} heads by {metric}")
rows = cs.table[cs.table["circuit"] == circuit].sort_values(metric, ascending=False, kind="stable")
st.dataframe(rows, hide_index=True, placeholder=MISSING, key="circuits_table")
