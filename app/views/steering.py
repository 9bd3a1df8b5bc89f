"""Steering page: per-layer separability of a contrast set, dose-response, layer sweep, steered vs unsteered text.

The sections and buttons are the verbs of ``lenslab steer`` / ``app.api.steer_<verb>``: **Extract**
(the form at the top: ``steer_extract``) stores a model × contrast set × hook × position
extraction; pick one and see each layer's held-out AUC and relative norm; pick a layer, method
and α; **Dose** measures the dose-response over α (``steer_dose``, stored; shown from
``find_dose_response`` when it is); **Layers** steers each layer with its own vector at that α
(``steer_layers``, stored; ``find_layer_sweep``); **Apply** compares greedy continuations of a
prompt with and without the vector (``steer_apply``; causal LMs only). Orthogonalising weights
writes a new model directory, so it stays on the command line (``lenslab steer orthogonalize``).
Charts come from ``app.charts_steering``; progress bars from ``app.state.run_with_st_progress``;
nothing is computed here.
"""

from __future__ import annotations

import time

import streamlit as st

from analysis.errors import LensLabError
from analysis.run import NotStoredError
from app import api
from app import charts_steering as charts
from app.allowed_paths import check_contrasts, check_source
from app.state import MISSING, get_store, link_model, pick_index, picked, remembered_model, run_with_st_progress

FLASH = "steer_flash"
HOOKS = ("resid_post", "resid_pre", "resid_mid", "attn_out", "mlp_out")


@st.cache_data(show_spinner="Loading the extraction from the store…", max_entries=8)
def _load(store_root: str, key: str):
    return api.load_extraction(key, store_root)


# The API calls of this page: typed paths and the stored source and contrast set (reopened to measure) must
# lie inside the dashboard's allowed roots; a refusal is a SourceError, shown by run_with_st_progress.
def _extract_api(spec: str, contrasts: str, **kwargs):
    return api.steer_extract(check_source(spec), check_contrasts(contrasts), **kwargs)


def _dose_api(source: str, vec, contrasts: str, **kwargs):
    return api.steer_dose(check_source(source), vec, check_contrasts(contrasts), **kwargs)


def _layers_api(source: str, contrasts: str, **kwargs):
    return api.steer_layers(check_source(source), check_contrasts(contrasts), **kwargs)


def _extract(spec: str, contrasts: str, hook: str, position: str, store) -> bool:
    start = time.perf_counter()
    ext = run_with_st_progress(f"Extracting {contrasts} from {spec}", _extract_api, spec, contrasts, hook=hook,
                               position=position, store=store, flash_key=FLASH)
    if ext is None:
        return False
    st.session_state[FLASH] = (f"Extracted {len(ext.layers)} layers × {len(ext.methods)} methods of "
                               f"{ext.meta['contrast']} from {spec} in {time.perf_counter() - start:.1f} s.")
    return True


def _find_dose(fingerprint: str, vec, contrasts: str, alphas: tuple[float, ...], scale: str, store):
    """The stored dose-response of ``vec`` with the page's α grid, else the newest one stored with another grid
    (``lenslab steer dose --alphas ...``), else None; and the grid found (index reads; never computes)."""
    if (dr := api.find_dose_response(fingerprint, vec, check_contrasts(contrasts), alphas=alphas, scale=scale,
                                     store=store)) is not None:
        return dr, alphas
    for entry in api.stored_dose_responses(fingerprint, store=store):
        p = entry.params
        if p.get("scale") != scale or p.get("layers") is not None or tuple(p.get("alphas") or ()) == alphas:
            continue
        grid = tuple(float(a) for a in p["alphas"])
        if (dr := api.find_dose_response(fingerprint, vec, check_contrasts(contrasts), alphas=grid, scale=scale,
                                         capability=bool(p.get("capability", True)), store=store)) is not None:
            return dr, grid
    return None, alphas


store = get_store()
st.title("Steering vectors")
st.caption("A contrast set pairs texts that differ in one concept. At each layer the difference of their activations "
           "gives a direction v; adding α·v at that layer steers the model, projecting it out ablates the concept. "
           "AUC: how well h·v̂ separates held-out positives from negatives (0.5 = chance).")
if msg := st.session_state.pop(FLASH, None):
    st.success(msg)

entries = api.stored_extractions(store=store)
with st.expander("Extract directions", expanded=not entries):
    with st.form("steer_form"):
        c1, c2, c3, c4 = st.columns([3, 3, 2, 2])
        spec = c1.text_input("Source", value="bilinear-lm", key="steer_source",
                             help="bilinear-lm (a tiny Llama trained here), minilm, tiny-mixtral, or a model directory.")
        sets = api.contrast_sets()
        contrast = c2.text_input("Contrast set", value=sets[0] if sets else "", key="steer_contrast",
                                 help=f"Bundled: {', '.join(sets)}; or the path of a .jsonl file.")
        hook = c3.selectbox("Hook", HOOKS, key="steer_hook")
        position = c4.text_input("Position", value="last", key="steer_position", help="last · mean · index:K")
        submitted = st.form_submit_button("Extract", type="primary")
    if submitted:
        if not spec.strip() or not contrast.strip():
            st.error("Give a source (e.g. bilinear-lm) and a contrast set (e.g. numpy-torch).")
        elif _extract(spec.strip(), contrast.strip(), hook, position.strip(), store):
            st.rerun()

if not entries:
    st.info("No steering directions stored yet. Press **Extract** above, or run "
            "`lenslab steer extract bilinear-lm numpy-torch` in a terminal.")
    st.stop()

models = store.models()
labels = {m.fingerprint: m.label for m in models}
by_key = {e.key: e for e in entries}
opens_on = remembered_model([e.fingerprint for e in entries], models)  # the newest extraction of that model
key = st.selectbox("Extraction", list(by_key), key="steer_entry",
                   index=pick_index("steer_entry", list(by_key),
                                    next((e.key for e in entries if e.fingerprint == opens_on), None)),
                   format_func=lambda k: f"{labels.get(by_key[k].fingerprint, by_key[k].fingerprint[:8])} · "
                                         f"{by_key[k].params['contrast']} · {by_key[k].params['hook']} · "
                                         f"{by_key[k].params['position']}",
                   on_change=picked, args=("steer_entry", lambda k: by_key[k].fingerprint))
link_model(by_key[key].fingerprint)
try:
    ext = _load(str(store.root), key)
except NotStoredError:
    st.warning("That entry was deleted; pick another or extract again.")
    st.stop()
except LensLabError as exc:
    st.error(str(exc))
    st.stop()
source = ext.meta.get("source", "")
st.plotly_chart(charts.separability(ext.table), key="steer_separability")
with st.expander("Per-layer table"):
    st.dataframe(ext.table, hide_index=True, placeholder=MISSING, key="steer_table")

c1, c2, c3, c4 = st.columns(4)
method = c1.selectbox("Method", list(ext.methods), key="steer_method")
best = ext.best_layer(method)
layer = c2.selectbox("Layer", list(ext.layers), index=list(ext.layers).index(best), key="steer_layer",
                     help=f"Best held-out AUC for {method}: layer {best}.")
scale = c3.selectbox("Scale", ("norm", "absolute"), key="steer_scale",
                     help="norm: h + α‖h‖·v̂ (α is a fraction of each token's norm); absolute: h + α·v.")
alpha = c4.number_input("α", value=0.4 if scale == "norm" else 4.0, step=0.1, key="steer_alpha", format="%.2f")
vec = api.steer_vector(ext, int(layer), method)
alphas = (-0.6, -0.4, -0.2, -0.1, 0.0, 0.1, 0.2, 0.4, 0.6) if scale == "norm" else (-8, -4, -2, -1, 0, 1, 2, 4, 8)
alphas = tuple(sorted(set(alphas) | {float(alpha)}))

st.subheader("Dose: the response to α on the held-out pairs")
try:
    dr, grid = _find_dose(vec.fingerprint, vec, ext.meta["contrast_origin"], alphas, scale, store)
except LensLabError as exc:
    st.error(str(exc))
    dr, grid = None, alphas
if (dr is None or grid != alphas) and st.button(
        "Dose", key="steer_dose", help=f"Measure the dose-response over α = {', '.join(f'{a:+g}' for a in alphas)} "
                                       "(stored)."):
    if run_with_st_progress("Steering", _dose_api, source, vec, ext.meta["contrast_origin"], alphas=alphas,
                            scale=scale, store=store, flash_key=FLASH) is not None:
        st.rerun()  # the success message and the stored result show at once
if dr is not None:
    if grid != alphas:
        st.caption(f"Stored with another α grid ({', '.join(f'{a:+g}' for a in grid)}), e.g. by `lenslab steer dose "
                   "--alphas`; press **Dose** to measure this page's grid "
                   f"({', '.join(f'{a:+g}' for a in alphas)}).")
    st.plotly_chart(charts.dose_response(dr.table, dr.kind, f"Dose-response · layer {layer} · {method} · {scale}"),
                    key="steer_dose_chart")
    st.dataframe(dr.table, hide_index=True, placeholder=MISSING, key="steer_dose_table")
else:
    st.caption("Not measured yet for this layer, method and scale.")

st.subheader("Layers: each layer's own vector at α")
st.caption(f"Each layer steered with its own {method} vector at α = {float(alpha):+g} ({scale}), on the held-out pairs.")
sweep_args = {"alpha": float(alpha), "method": method, "hook": ext.meta["hook"], "position": ext.meta["position"],
              "scale": scale}
try:
    sweep = api.find_layer_sweep(vec.fingerprint, check_contrasts(ext.meta["contrast_origin"]), store=store,
                                   **sweep_args)
except LensLabError as exc:
    st.error(str(exc))
    sweep = None
if sweep is None and st.button("Layers", key="steer_layers", help="Steer each layer with its own vector (stored)."):
    if run_with_st_progress("Sweeping layers", _layers_api, source, ext.meta["contrast_origin"], store=store,
                            flash_key=FLASH, **sweep_args) is not None:
        st.rerun()  # the success message and the stored sweep show at once
if sweep is not None:
    st.plotly_chart(charts.layer_sweep(sweep, f"Layer sweep · α = {float(alpha):+g} · {method} · {scale}"),
                    key="steer_layers_chart")
    st.dataframe(sweep, hide_index=True, placeholder=MISSING, key="steer_layers_table")
else:
    st.caption("No layer sweep stored for this method, α and scale.")

st.subheader("Apply: steered vs unsteered text")
prompt = st.text_input("Prompt", value="Returns a new", key="steer_prompt")
if st.button("Apply", key="steer_apply", help="Continue the prompt without and with the vector."):
    try:
        out = api.steer_apply(check_source(source), vec, prompt, alpha=float(alpha), scale=scale)
    except LensLabError as exc:
        st.error(str(exc))
    else:
        left, right = st.columns(2)
        left.markdown("**unsteered**")
        left.code(prompt + out["unsteered"], language=None, wrap_lines=True)
        right.markdown(f"**steered** (α = {float(alpha):+g}, {scale})")
        right.code(prompt + out["steered"], language=None, wrap_lines=True)
