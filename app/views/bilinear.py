"""Bilinear MLPs page: eigendecompositions of GLU / bilinear layers (``app.api.bilinear_decompose``).

Pick a stored decomposition (model, layer, direction spec), then one direction: its eigenvalue
spectrum, its top positive and negative eigenvectors (8×8 images for the digits model, top
tokens for an LM), the truncation curve, and an input explorer showing which eigenvectors
drive a prediction. The form at the top runs ``app.api.bilinear_decompose`` (training the
bundled model on first use) with a progress bar. Everything shown is read from the store; the
page computes nothing itself (top eigenvectors and explanations come from ``app.api``).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import streamlit as st

from analysis.errors import LensLabError
from analysis.run import NotStoredError
from app import api
from app import charts_bilinear as charts
from app.allowed_paths import check_direction, check_source
from app.state import MISSING, get_store, link_model, pick_index, picked, remembered_model

N_IMAGES = 4  # top positive and top negative eigenvectors shown as images
FLASH = "bilinear_flash"
TRAINED = {"bilinear-digits": "digits", "bilinear-lm": "lm", "tiny-mixtral": "mixtral"}  # bundled, trained here


@st.cache_data(show_spinner="Loading the decomposition from the store…", max_entries=8)
def _load(store_root: str, key: str):
    return api.load_bilinear(key, store_root)


def _decompose_with_progress(spec: str, layer: int, direction: str, expert: int | None, store) -> bool:
    bar = st.progress(0.0, text=f"Decomposing {spec}…")

    def progress(done: int, total: int, item: str) -> None:
        bar.progress(min(done / total, 1.0) if total else 0.0, text=f"{spec}: {item}")

    start = time.perf_counter()
    try:  # typed paths (the source, a vector: or sae: direction file) must lie inside the allowed roots
        source = check_source(spec)
        checked_direction = check_direction(direction or None)
        if source in TRAINED:  # train (or find in the cache) first, with its own progress
            api.bilinear_train(TRAINED[source], progress=lambda d, t, item: progress(d, t, f"training: {item}"))
        rep = api.bilinear_decompose(source, layer=layer, direction=checked_direction, expert=expert, store=store,
                                     progress=progress)
    except LensLabError as exc:
        bar.empty()
        st.error(str(exc))
        return False
    st.session_state[FLASH] = (f"Decomposed {spec} layer {layer} along {rep.direction}: {len(rep.labels)} "
                               f"directions in {time.perf_counter() - start:.1f} s.")
    return True


store = get_store()
st.title("Bilinear MLPs")
st.caption("For an output direction u, a bilinear layer's output uᵀ P((Wx)⊙(Vx)) is the quadratic form x̃ᵀQx̃ with "
           "Q = sym(Wᵀ diag(Pᵀu) V) = Σ λᵢ vᵢvᵢᵀ: each eigenvector vᵢ is an input pattern whose squared match "
           "adds λᵢ (vᵢ·x̃)² to the output, exactly.")
if msg := st.session_state.pop(FLASH, None):
    st.success(msg)

entries = api.stored_bilinear(store=store)
with st.expander("Decompose a model", expanded=not entries):
    with st.form("bilinear_form"):
        c1, c2, c3, c4 = st.columns([3, 1, 3, 1])
        spec = c1.text_input("Source", value="bilinear-digits", key="bl_source",
                             help="bilinear-digits (trains in ~10 s on first use), bilinear-lm (~2 min), "
                                  "tiny-mixtral, or a model directory / .safetensors file on this machine.")
        layer_in = c2.number_input("Layer", min_value=0, value=0, step=1, key="bl_layer")
        direction_in = c3.text_input("Direction", value="class:all", key="bl_direction",
                                     help="class:all · class:3,5 · token:the,def · token:#17 · resid:0,1 · "
                                          "vector:u.npy · sae:DIR:5 · hosvd:8 (empty = HOSVD)")
        expert_in = c4.text_input("Expert", value="", key="bl_expert", help="MoE layers only")
        submitted = st.form_submit_button("Decompose", type="primary")
    if submitted:
        try:
            expert = int(expert_in) if expert_in.strip() else None
        except ValueError:
            st.error(f"Expert {expert_in!r} is not an integer; leave it empty unless the layer is a mixture of experts.")
        else:
            if spec.strip() and _decompose_with_progress(spec.strip(), int(layer_in), direction_in.strip(), expert,
                                                         store):
                st.rerun()
            elif not spec.strip():
                st.error("The source is empty; type bilinear-digits or a path to a model.")

if not entries:
    st.info("No decompositions stored yet. Press **Decompose** above, or run "
            "`lenslab bilinear decompose bilinear-digits --direction class:all` in a terminal.")
    st.stop()

models = store.models()
labels = {m.fingerprint: m.label for m in models}
fps = list(dict.fromkeys(e.fingerprint for e in entries))
c1, c2, c3 = st.columns([2, 1, 2])
fp = c1.selectbox("Model", fps, key="bl_model", index=pick_index("bl_model", fps, remembered_model(fps, models)),
                  format_func=lambda f: f"{labels.get(f, f[:8])} ({f[:8]})", on_change=picked, args=("bl_model",))
link_model(fp)
mine = [e for e in entries if e.fingerprint == fp]


def _layer_name(e) -> str:
    return f"{e.params['layer']}" + (f" · expert {e.params['expert']}" if e.params.get("expert") is not None else "")


layer_names = sorted({_layer_name(e) for e in mine}, key=lambda s: [int(t) for t in s.split() if t.isdigit()])
layer_name = c2.selectbox("Layer", layer_names, key="bl_layer_pick")
by_key = {e.key: e for e in mine if _layer_name(e) == layer_name}
entry_key = c3.selectbox("Directions", list(by_key), key="bl_spec",
                         format_func=lambda key: by_key[key].params["direction"])
entry = by_key[entry_key]

try:
    rep = _load(str(store.root), entry.key)
except NotStoredError:
    st.warning("That entry was deleted; pick another or decompose again.")
    st.stop()
except LensLabError as exc:
    st.error(str(exc))
    st.stop()
dec = rep.decomposition

for note in dec.notes:
    st.warning(note)
k = st.selectbox("Direction", range(len(dec.labels)), key="bl_direction_pick", format_func=lambda i: dec.labels[i])
lam = dec.eigenvalues[k]
m1, m2, m3, m4 = st.columns(4)
m1.metric("eigenvectors", len(lam))
m2.metric("effective rank", f"{dec.effective_rank[k]:.2f}")
m3.metric("λ max / min", f"{lam.max():+.3g} / {lam.min():+.3g}")
m4.metric("decomposition", "exact" if dec.exact else "bilinear part")
st.caption(f"Layer `{rep.meta.get('layer_name')}` · input {'x̃ = [x; 1]' if dec.biased else 'x'} of width "
           f"{lam.size} · gate activation `{dec.gate_act}`.")

st.plotly_chart(charts.eigen_spectrum(lam, dec.labels[k]), key="bl_spectrum")

pos, neg = api.bilinear_top(rep, k, N_IMAGES)
if rep.images is not None:
    st.subheader("Top eigenvectors in pixel space")
    st.caption("Each eigenvector through the embedding (Eᵀv), scaled to ±1. Positive eigenvalues: images that "
               "match (either sign) raise the output; negative: they lower it.")
    if len(pos):
        st.plotly_chart(charts.eigenvector_images(rep.images[k], lam, pos, f"{dec.labels[k]}: top positive"),
                        key="bl_images_pos")
    if len(neg):
        st.plotly_chart(charts.eigenvector_images(rep.images[k], lam, neg, f"{dec.labels[k]}: top negative"),
                        key="bl_images_neg")
elif rep.top_tokens is not None and len(rep.top_tokens):
    st.subheader("Top tokens of the top eigenvectors")
    st.caption("Tokens whose embedding (through the MLP's RMSNorm) has the largest |v·x̃|: the inputs each "
               "eigenvector responds to most, ignoring attention.")
    tt = rep.top_tokens[rep.top_tokens["direction"] == dec.labels[k]]
    summary = (tt.sort_values(["eigen", "rank"]).groupby(["eigen", "eigenvalue", "sign"], sort=False)["token"]
               .agg(lambda s: " · ".join(repr(t) for t in s)).reset_index())
    st.dataframe(summary.sort_values("eigenvalue", ascending=False, key=np.abs), hide_index=True, placeholder=MISSING,
                 key="bl_tokens")

if rep.truncation is not None:
    st.subheader("Truncation")
    what = "test accuracy" if np.isfinite(rep.truncation.accuracy).any() else "agreement of the argmax"
    st.caption(f"Keeping the top-k eigenvectors of every direction ({what} and relative error of the outputs "
               f"on {rep.meta.get('n_eval', '?')} held-out inputs).")
    st.plotly_chart(charts.truncation(rep.truncation), key="bl_truncation")

if rep.explorer_contrib is not None:
    st.subheader("Input explorer")
    n_inputs = len(rep.explorer_contrib)
    i = int(st.number_input(f"Input (0..{n_inputs - 1})", min_value=0, max_value=n_inputs - 1, value=0, step=1,
                            key="bl_input"))
    ex = api.bilinear_explain(rep, i)
    left, right = st.columns([1, 2])
    if rep.explorer_x is not None:
        truth = int(rep.explorer_labels[i]) if rep.explorer_labels is not None else None
        left.plotly_chart(charts.digit(rep.explorer_x[i], f"label {truth}"), key="bl_digit")
    elif rep.explorer_tokens is not None:
        row = rep.explorer_tokens.iloc[i]
        left.markdown(f"**token** `{row['token']!r}`  \n**context** `{row['context']}`")
    left.markdown(f"**largest output:** {dec.labels[ex.predicted]} ({ex.outputs[ex.predicted]:+.3g})")
    left.dataframe(pd.DataFrame({"direction": dec.labels, "output": ex.outputs}), hide_index=True, placeholder=MISSING,
                   key="bl_outputs")
    right.plotly_chart(charts.contribution_bars(ex.contributions, f"What drives {dec.labels[ex.predicted]}"),
                       key="bl_contrib")
