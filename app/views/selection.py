"""KappaTune selection page: preview which tensors a budget and ranker pick, then download the
selection for PEFT, axolotl or as a plain parameter list.

Works from the stored spectra alone (``app.api.select_from_spectra``, the selection ``lenslab select``
makes; the texts from ``app.api.export_text``), so the model's files are not needed once its spectra
are in the store.
"""

from __future__ import annotations

import streamlit as st

from analysis.errors import LensLabError
from analysis.weights.export import FORMATS
from analysis.weights.selection import RANKERS, Budget
from app import api
from app.state import MISSING, get_store, has_spectra, load_spectra, model_picker

BUDGET_KINDS = {"% of tensors": "fraction", "count": "count", "% of params": "param_fraction"}
RANKER_HELP = {
    "lowest_kappa": "KappaTune: best-conditioned tensors (lowest κ) first",
    "highest_kappa": "contrast: worst-conditioned tensors first",
    "random": "seeded random baseline",
    "low_rank": "WeLore: most low-rank-like spectra first",
}
DOWNLOADS = {  # format -> (file name, mime type, code language)
    "params": ("selected_params.txt", "text/plain", None),
    "peft": ("lora_config.json", "application/json", "json"),
    "axolotl": ("axolotl_unfrozen.yaml", "application/x-yaml", "yaml"),
}

store = get_store()
st.title("KappaTune selection")
if (model := model_picker(store, key="selection_model", prefer=lambda m: has_spectra(store, m.fingerprint))) is None:
    st.stop()
try:
    ws = load_spectra(store, model.fingerprint)
except LensLabError as exc:
    st.error(str(exc))
    st.stop()
if ws is None:
    st.info(f"No spectra stored for {model.label} yet; compute them on the Conditioning & spectra page.")
    st.page_link("views/spectra.py", label="Conditioning & spectra", icon=":material/show_chart:")
    st.stop()

c1, c2, c3 = st.columns([1, 1, 1])
kind_label = c1.radio("Budget", list(BUDGET_KINDS), horizontal=True, key="budget_kind")
kind = BUDGET_KINDS[kind_label]
if kind == "count":
    amount = c1.number_input("Tensors to select", value=8, step=1, key="budget_count")
    budget_value: float = int(amount)
    problem = None if amount >= 1 else f"A budget of {amount:g} tensors selects nothing: type a count of 1 or more."
else:  # no min/max on the widget: an out-of-range value is said in words, not only outlined in red and ignored
    amount = c1.number_input(f"Budget ({kind_label})", value=20.0, step=5.0, key=f"budget_{kind}")
    budget_value = float(amount) / 100
    problem = (None if 0 < amount <= 100 else
               f"A budget of {amount:g}{kind_label[0]} {kind_label[2:]} is outside 0–100%: type a share above 0 and "
               f"at most 100" + (", or pick **count** to select a number of tensors." if amount > 100 else "."))
ranker = c2.selectbox("Ranker", RANKERS, key="ranker", help="; ".join(f"{r}: {h}" for r, h in RANKER_HELP.items()))
seed = c2.number_input("Seed (random ranker)", min_value=0, value=0, step=1, key="seed",
                       disabled=ranker != "random")
include = c3.text_input("Include regex", value="", key="include", help="re.search on the tensor name; empty = all")
exclude = c3.text_input("Exclude regex", value="", key="exclude", help="e.g. embeddings|pooler")

if problem:
    st.error(problem)
    st.stop()
try:
    selection = api.select_from_spectra(ws, Budget(kind, budget_value), ranker=ranker, include=include or None,
                                        exclude=exclude or None, seed=int(seed), fingerprint=model.fingerprint)
except LensLabError as exc:
    st.error(str(exc))
    st.stop()

cand = selection.candidates
m1, m2, m3 = st.columns(3)
m1.metric("tensors selected", f"{len(selection.params)} of {len(cand)}")
m2.metric("parameters selected", f"{selection.n_params_selected:,}")
share = selection.n_params_selected / selection.n_params_total if selection.n_params_total else 0.0
m3.metric("share of candidate parameters", f"{share:.1%}")
st.caption(selection.summary())
if selection.excluded:
    st.warning(f"{len(selection.excluded)} tensors with NaN/Inf weights are not candidates: "
               + ", ".join(selection.excluded[:10]))

cols = ["rank", "tensor", "layer", "module_type", "shape", "n_params", "kappa", "welore_fraction", "score"]
st.dataframe(cand.loc[cand["selected"], [c for c in cols if c in cand.columns]], hide_index=True, placeholder=MISSING,
             key="selected_table")
with st.expander(f"All {len(cand)} candidates in rank order"):
    st.dataframe(cand, hide_index=True, placeholder=MISSING)

st.subheader("Export")
with st.expander("PEFT LoRA settings"):
    p1, p2 = st.columns(2)
    lora_r = int(p1.number_input("r", min_value=1, value=8, step=1, key="lora_r"))
    lora_alpha = int(p2.number_input("lora_alpha", min_value=1, value=16, step=1, key="lora_alpha"))
for tab, fmt in zip(st.tabs(list(FORMATS)), FORMATS):
    file_name, mime, language = DOWNLOADS.get(fmt, (f"selection_{fmt}.txt", "text/plain", None))
    try:
        text = api.export_text(selection, fmt, lora_r=lora_r, lora_alpha=lora_alpha)
    except LensLabError as exc:
        tab.error(str(exc))
        continue
    tab.download_button(f"Download {file_name}", data=text, file_name=file_name, mime=mime, key=f"download_{fmt}",
                        on_click="ignore", icon=":material/download:")
    tab.code(text, language=language)
