"""Models page: what the store holds, and a form to analyse another model.

The form passes the typed source spec to ``app.api.analyze`` as given: a bundled name such as
``minilm``, or a directory / ``.safetensors`` file on the machine running the dashboard.
"""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import streamlit as st

from app.state import MISSING, analyze_with_progress, get_store

FLASH = "home_flash"

store = get_store()
st.title("Models")

if msg := st.session_state.pop(FLASH, None):
    st.success(msg)

models = store.models()
if not models:
    st.info("The store is empty. Run `lenslab analyze minilm` in a terminal, or press **Analyse** below "
            "to analyse the bundled MiniLM.")
else:
    entries = store.list()
    rows = []
    for m in models:
        mine = [e for e in entries if e.fingerprint == m.fingerprint]
        rows.append({
            "label": m.label,
            "also seen as": ", ".join(m.aliases),
            "kind": m.kind,
            "params": m.n_params,
            "tensors": m.n_tensors,
            "analyses": ", ".join(sorted({e.analysis for e in mine})),
            "last run": datetime.fromtimestamp(max(e.created for e in mine)) if mine else None,
            "fingerprint": m.fingerprint,
        })
    st.dataframe(pd.DataFrame(rows), hide_index=True, placeholder=MISSING, width="stretch",
                 column_config={"params": st.column_config.NumberColumn(format="compact"),
                                "also seen as": st.column_config.TextColumn(
                                    help="Other names or paths the same weights were analysed from; a model keeps "
                                         "the label it was first stored under."),
                                "last run": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss")})
    plural = {1: ""}
    st.caption(f"{len(models)} model{plural.get(len(models), 's')}, {len(entries)} stored "
               f"result{plural.get(len(entries), 's')}. "
               "Open **Conditioning & spectra** or **KappaTune selection** in the sidebar.")

st.subheader("Analyse a model")
with st.form("analyse"):
    spec = st.text_input("Source", value="minilm", key="home_source",
                         help="A bundled model name (minilm), a Hugging Face model directory, a .safetensors file "
                              "or a shard index on this machine.")
    refresh = st.checkbox("Recompute even if stored", value=False)
    submitted = st.form_submit_button("Analyse", type="primary")

if submitted:
    spec = spec.strip()
    if not spec:
        st.error("The source is empty; type a bundled name (minilm) or a path to a model directory or file.")
    elif (ws := analyze_with_progress(spec, store, refresh=refresh)) is not None:
        st.session_state[FLASH] = (f"Analysed {spec}: {len(ws.table)} matrices, "
                                   f"{len(ws.skipped)} 1-D tensors skipped.")
        st.rerun()
