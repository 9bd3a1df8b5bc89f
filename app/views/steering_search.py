"""Steering search page: the Pareto front of behaviour effect against side effects, the per-source comparison,
the chosen setting, and the audit of weight edits.

**Search** (the form) runs ``api.steer_search`` (stored; settings already stored are not recomputed);
pick a stored search to see its front (``app.charts_steering_search.pareto``), the front and every
evaluated setting as tables, the best effect of each direction source at equal side effect, and the
chosen setting with the command that exports it. Stored weight-edit audits (``lenslab steer audit``)
are listed below with their per-tensor table. Nothing is computed here.
"""

from __future__ import annotations

import time

import streamlit as st

from analysis.errors import LensLabError
from analysis.run import NotStoredError
from app import api
from app.allowed_paths import check_contrasts, check_source
from app.charts_steering_search import pareto
from app.state import MISSING, get_store, run_with_st_progress

FLASH = "ss_flash"
METHODS = ("mean_diff", "pca", "logistic")
SITES = ("resid_post", "resid_pre", "attn_out")


@st.cache_data(show_spinner="Loading the search from the store…", max_entries=8)
def _load(store_root: str, key: str):
    return api.load_search(key, store_root)


@st.cache_data(show_spinner="Loading the audit from the store…", max_entries=8)
def _load_audit(store_root: str, key: str):
    return api.load_audit(key, store_root)


def _search_api(spec: str, contrasts: str, **kwargs):
    return api.steer_search(check_source(spec), check_contrasts(contrasts), **kwargs)


store = get_store()
st.title("Steering search")
st.caption("Layers × strengths × direction sources, each setting scored by its behaviour effect on held-out prompts "
           "(LM: log-probability shift of the target vs the opposite concept tokens; encoder: probe-class shift) "
           "and its side effect on neutral text (LM: KL to the unsteered model per token; encoder: embedding drift). "
           "α is in units of the layer's mean token norm.")
if msg := st.session_state.pop(FLASH, None):
    st.success(msg)

entries = api.stored_searches(store=store)
with st.expander("Search", expanded=not entries):
    with st.form("ss_form"):
        c1, c2, c3 = st.columns([3, 3, 2])
        spec = c1.text_input("Source", value="bilinear-lm", key="ss_source",
                             help="bilinear-lm, minilm, or a model directory.")
        sets = api.contrast_sets()
        contrast = c2.text_input("Contrast set", value=sets[0] if sets else "", key="ss_contrast",
                                 help=f"Bundled: {', '.join(sets)}; or the path of a .jsonl file.")
        site = c3.selectbox("Site", SITES, key="ss_site")
        c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
        methods = c1.multiselect("Direction sources", METHODS, default=list(METHODS), key="ss_methods")
        lo = c2.number_input("α low", value=-1.0, step=0.25, key="ss_lo")
        hi = c3.number_input("α high", value=1.0, step=0.25, key="ss_hi")
        budget = c4.number_input("Budget (passes)", value=240, min_value=1, step=20, key="ss_budget")
        submitted = st.form_submit_button("Search", type="primary")
    if submitted:
        start = time.perf_counter()
        res = run_with_st_progress("Searching", _search_api, spec.strip(), contrast.strip(), sources=methods,
                                   site=site, strengths=(float(lo), float(hi)), budget=int(budget), store=store,
                                   flash_key=FLASH)
        if res is not None:
            st.session_state[FLASH] = (f"Searched {res.meta['n_settings']} settings "
                                       f"({res.meta['settings_computed']} new) in {time.perf_counter() - start:.1f} s.")
            st.rerun()

if not entries:
    st.info("No steering search stored yet. Press **Search** above, or run "
            "`lenslab steer search bilinear-lm numpy-torch` in a terminal.")
    st.stop()

labels = {m.fingerprint: m.label for m in store.models()}
by_key = {e.key: e for e in entries}
key = st.selectbox("Search", list(by_key), key="ss_entry",
                   format_func=lambda k: f"{labels.get(by_key[k].fingerprint, by_key[k].fingerprint[:8])} · "
                                         f"{by_key[k].params['site']} · {', '.join(by_key[k].params['sources'])} · "
                                         f"budget {by_key[k].params['budget']}")
try:
    res = _load(str(store.root), key)
except NotStoredError:
    st.warning("That entry was deleted; pick another or search again.")
    st.stop()
except LensLabError as exc:
    st.error(str(exc))
    st.stop()

m, c, side = res.meta, res.chosen, res.side
cols = st.columns(4)
cols[0].metric("Chosen", f"{c['source']} · L{c['layer']}")
cols[1].metric("α (× mean norm)", f"{c['alpha']:+.4g}")
cols[2].metric("Effect", f"{c['effect']:+.4g}")
cols[3].metric(side, f"{c[side]:.4g}", help=f"limit {m['max_side']:g}")
st.caption(f"{m['contrast']} · {m['site']} · budget {m['budget']} forward passes: baseline {m['baseline_passes']} + "
           f"{m['n_settings']} settings × {m['passes_per_setting']}. Export: `lenslab steer search "
           f"{m['source']} {m['contrast']} --budget {m['budget']} --out chosen.safetensors` (served from the store).")
st.plotly_chart(pareto(res.table, side), key="ss_pareto")
st.subheader("Pareto front")
st.dataframe(res.front.drop(columns=["on_front"]), hide_index=True, key="ss_front", placeholder=MISSING)
st.subheader(f"Direction sources at equal {side}")
st.caption(f"Best effect of each source among its settings with {side} at or below each level; wins_at: the levels "
           "where it is best.")
st.dataframe(res.comparison, hide_index=True, key="ss_comparison", placeholder=MISSING)
with st.expander(f"Every evaluated setting ({len(res.table)})"):
    st.dataframe(res.table, hide_index=True, key="ss_all", placeholder=MISSING)

st.subheader("Audit of weight edits")
audits = api.stored_audits(store=store)
if not audits:
    st.info("No audit stored. Run `lenslab steer audit bilinear-lm chosen.safetensors` to compare an orthogonalised "
            "and a norm-preserving edit.")
    st.stop()
by_audit = {e.key: e for e in audits}
akey = st.selectbox("Audit", list(by_audit), key="ss_audit",
                    format_func=lambda k: f"{labels.get(by_audit[k].fingerprint, by_audit[k].fingerprint[:8])} · "
                                          f"{by_audit[k].params.get('vector', '')[:8]}")
try:
    audit = _load_audit(str(store.root), akey)
except LensLabError as exc:
    st.error(str(exc))
    st.stop()
st.dataframe(audit.summary, hide_index=True, key="ss_audit_summary", placeholder=MISSING)
with st.expander("Per tensor"):
    st.dataframe(audit.tensors, hide_index=True, key="ss_audit_tensors", placeholder=MISSING)
