"""Experts page: MMoE expert specialisation and routed-MoE usage, read from the store.

Top: the specialisation curve of a stored ``mmoe.curve`` (class-level polysemanticity and
accuracy against the number of experts), then one MMoE in detail: the expert x class heatmap,
the load histogram, the ablation table and the top-activating examples of an expert; the
bias-correction demos. Bottom: routing statistics of routed MoEs (``experts.routing``).
The forms run ``app.api.mmoe_analyze`` / ``app.api.experts_routing`` with a progress bar.
"""

from __future__ import annotations

from datetime import datetime

import streamlit as st

from app import api
from app import charts_experts as charts
from app.allowed_paths import check_source
from app.state import MISSING, get_store, link_model, pick_index, picked, remembered_model, run_with_st_progress

FLASH = "experts_flash"
ABLATION_COLUMNS = ["expert", "load", "usage", "n_flipped", "accuracy_drop", "n_classes_hurt", "polysemanticity",
                    "null_polysemanticity", "effect", "effect_polysemanticity", "top_class", "class_entropy"]


@st.cache_data(show_spinner="Loading from the store…", max_entries=32)
def _curve(store_root: str, key: str):
    return api.load_mmoe_curve(key, store_root)


@st.cache_data(show_spinner="Loading the expert report…", max_entries=32)
def _report(store_root: str, key: str):
    """The report, or None when it was deleted (load_expert_report raises NotStoredError, a KeyError)."""
    try:
        return api.load_expert_report(key, store_root)
    except KeyError:
        return None


@st.cache_data(show_spinner="Loading from the store…", max_entries=32)
def _routing_stats(store_root: str, key: str):
    return api.load_experts_routing(key, store_root)


def _routing(spec: str, **kwargs):
    """``api.experts_routing`` on a typed source, refused outside the dashboard's allowed roots."""
    return api.experts_routing(check_source(spec), **kwargs)


def _run(label: str, fn, *args, **kwargs):
    """Run an API call under a progress bar; None (after st.error) on a LensLab error."""
    return run_with_st_progress(label, fn, *args, flash_key=FLASH, **kwargs)


def _curve_label(entry) -> str:
    p = entry.params
    data = p["data"]["data"]
    when = datetime.fromtimestamp(entry.created).strftime("%Y-%m-%d %H:%M")
    return (f"{data} · {p['probe']['layer'].upper()} {p['probe']['gate']} · experts "
            f"{','.join(map(str, p['experts']))} · {when}")


store = get_store()
st.title("Experts")
if msg := st.session_state.pop(FLASH, None):
    st.success(msg)

# ------------------------------------------------------------------------------------------ MMoE
st.header("MMoE expert specialisation")
st.caption("Multilinear mixture of experts probes (Oldfield et al. 2024) on frozen features: each expert count "
           "gets its own probe, rank chosen to fit the parameter budget of the linear layer it replaces. "
           "Class-level polysemanticity = entropy (bits) of the classes whose predictions change when one expert's "
           "coefficient is zeroed; dashed lines are size-matched nulls (predicted classes shuffled).")
curves = api.stored_mmoe_curves(store=store)
with st.expander("Run the specialisation analysis", expanded=not curves):
    with st.form("mmoe_form"):
        c1, c2, c3, c4 = st.columns([1, 2, 1, 1])
        data = c1.selectbox("Data", ["digits", "docstrings"], key="mmoe_data",
                            help="digits: sklearn 8x8 images (~1 min for 6 expert counts); docstrings: MiniLM "
                                 "embeddings of which-package-is-this-docstring-from (~2 min more the first time)")
        experts_in = c2.text_input("Expert counts", value="8,16,32,64,128,256", key="mmoe_experts")
        layer = c3.selectbox("Layer", ["cp", "tr"], key="mmoe_layer")
        epochs = c4.number_input("Epochs", min_value=1, value=40, step=5, key="mmoe_epochs")
        run = st.form_submit_button("Analyse", type="primary")
    if run and _run(f"MMoE specialisation on {data}", api.mmoe_analyze, data, experts_in, layer=layer,
                    epochs=int(epochs), store=store) is not None:
        st.rerun()

if not curves:
    st.info("No MMoE curves in the store yet. Run `lenslab mmoe analyze` in a terminal (digits, about a minute), "
            "or press **Analyse** above.")
else:
    by_key = {e.key: e for e in curves}
    key = st.selectbox("Curve", list(by_key), format_func=lambda k: _curve_label(by_key[k]), key="mmoe_curve")
    curve = _curve(str(store.root), key)
    m = curve.meta
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("linear probe accuracy", f"{m['linear_probe']['test_accuracy']:.3f}",
              help=f"{m['linear_probe']['n_params']:,} parameters")
    if m.get("matched_linear"):
        c2.metric("parameter-matched linear layer", f"{m['matched_linear']['test_accuracy']:.3f}",
                  help=f"replaced layer: {m['matched_linear']['layer_params']:,} parameters")
    best = curve.table.loc[curve.table["accuracy"].idxmax()]
    c3.metric("best MMoE accuracy", f"{best['accuracy']:.3f}", help=f"{int(best['n_experts'])} experts")
    c4.metric("samples analysed", f"{m['n_eval']:,}", help=f"eval_on = {m['analysis']['eval_on']}")
    left, right = st.columns([3, 2])
    left.plotly_chart(charts.specialisation_curve(curve.table), key="curve_poly")
    right.plotly_chart(charts.accuracy_curve(curve.table, m["linear_probe"]["test_accuracy"],
                                             (m.get("matched_linear") or {}).get("test_accuracy")), key="curve_acc")
    with st.expander("Curve table"):
        st.dataframe(curve.table, hide_index=True, placeholder=MISSING, key="curve_table")

    st.subheader("One MMoE in detail")
    counts = sorted(curve.keys)
    upto64 = [c for c in counts if c <= 64]  # default: the largest count up to 64 (readable heatmap)
    n = st.selectbox("Number of experts", counts, index=counts.index(max(upto64)) if upto64 else 0, key="mmoe_n")
    report = _report(str(store.root), curve.keys[n]) if n in curve.keys else None
    if report is None:
        st.warning(f"The report for {n} experts is no longer in the store; rerun `lenslab mmoe analyze`.")
    else:
        left, right = st.columns([3, 2])
        left.plotly_chart(charts.expert_class_heatmap(report.expert_class, report.classes), key="expert_class")
        right.plotly_chart(charts.load_histogram(report.experts["load"].to_numpy(),
                                                 report.summary["load_threshold"]), key="load_hist")
        s = report.summary
        right.markdown(f"**{s['experts_loaded']}** of {s['n_experts']} experts dominate at least one sample; "
                       f"on average **{s['mean_active_experts']:.1f}** experts have a non-zero coefficient per "
                       f"sample (entmax-1.5 gates are sparse); usage entropy {s['usage_entropy']:.2f} of "
                       f"{s['max_usage_entropy']:.2f} bits.")
        st.markdown("**Counterfactual ablation** (one expert's coefficient set to 0; sorted by effect)")
        cols = [c for c in ABLATION_COLUMNS if c in report.experts.columns]
        table = report.experts[cols].sort_values("effect", ascending=False)
        table = table.assign(top_class=[report.classes[c] if c >= 0 else "" for c in table["top_class"]])
        st.dataframe(table, hide_index=True, placeholder=MISSING, key="ablation_table",
                     column_config={"usage": st.column_config.NumberColumn(format="%.4f"),
                                    "accuracy_drop": st.column_config.NumberColumn(format="%.4f")})
        st.markdown("**Top-activating examples**")
        ranked = list(table["expert"])
        expert = st.selectbox("Expert", ranked, key="mmoe_expert",
                              format_func=lambda k: f"expert {k} (top class {report.top_class(k)})")
        ex_rows = report.examples[report.examples["expert"] == expert]
        if report.images is not None:
            cols_img = st.columns(len(ex_rows))
            for col, (_, row) in zip(cols_img, ex_rows.iterrows()):
                col.image(report.example_image(expert, int(row["rank"])),
                          caption=f"{row['label']} · a={row['gate']:.2f}", clamp=True)
        st.dataframe(ex_rows[["rank", "gate", "label", "predicted", "text"]], hide_index=True, placeholder=MISSING,
                     key="examples")

demos = api.stored_mmoe_bias(store=store)
if demos:
    st.subheader("Bias correction")
    demo = api.load_mmoe_bias(demos[0].key, store)
    st.markdown(f"Target **{demo.target}** (only {demo.meta['keep']:.0%} of its training samples kept): experts "
                f"{list(demo.experts)} scaled by {demo.meta['scale']} — accuracy {demo.accuracy_before:.3f} → "
                f"{demo.accuracy_after:.3f} on {demo.meta['n_eval']} held-out samples.")
    st.dataframe(demo.table, hide_index=True, placeholder=MISSING, key="bias_table")

# ------------------------------------------------------------------------------------- routed MoE
st.header("Routed MoE usage")
routed = api.stored_experts_routing(store=store)
with st.expander("Analyse a routed MoE", expanded=not routed):
    with st.form("routing_form"):
        spec = st.text_input("Source", value="tiny-mixtral", key="routing_source",
                             help="tiny-mixtral (trained on first use) or a Mixtral-style directory on this machine")
        go_routing = st.form_submit_button("Analyse routing", type="primary")
    if go_routing and spec.strip() and _run(f"routing of {spec.strip()}", _routing, spec.strip(),
                                            store=store) is not None:
        st.rerun()
if not routed:
    st.info("No routing statistics yet. Run `lenslab experts tiny-mixtral` in a terminal, or use the form above.")
else:
    models = store.models()
    labels = {m.fingerprint: m.label for m in models}
    opens_on = remembered_model([e.fingerprint for e in routed], models)
    idx = st.selectbox("Model", range(len(routed)), key="routing_pick",
                       index=pick_index("routing_pick", range(len(routed)),
                                        next((i for i, e in enumerate(routed) if e.fingerprint == opens_on), None)),
                       on_change=picked, args=("routing_pick", lambda i: routed[i].fingerprint),
                       format_func=lambda i: f"{labels.get(routed[i].fingerprint, routed[i].fingerprint[:8])} "
                                             f"({datetime.fromtimestamp(routed[i].created):%Y-%m-%d %H:%M})")
    link_model(routed[idx].fingerprint)
    stats = _routing_stats(str(store.root), routed[idx].key)
    meta = stats.meta
    st.caption(f"{meta['n_experts']} experts, top-{meta['top_k']}, {meta['n_tokens']:,} tokens of {meta['n_texts']} "
               f"docstrings; hooks read through {meta['backend']}. load_balance = E·Σ f_i P_i (1 = even); token "
               "specialisation = share of a token's occurrences routed to its most frequent expert.")
    st.dataframe(stats.layers, hide_index=True, placeholder=MISSING, key="routing_layers")
    E = meta["n_experts"]
    names = [f"e{e}" for e in range(E)]
    left, right = st.columns(2)
    left.plotly_chart(charts.routing_heatmap(stats.usage, x=names, y=[f"layer {i}" for i in range(len(stats.usage))],
                                             title="expert usage (share of assignments)", zlabel="share"),
                      key="routing_usage")
    layer = right.selectbox("Layer", list(range(len(stats.usage))), key="routing_layer")
    right.plotly_chart(charts.routing_heatmap(stats.coactivation[layer], x=names, y=names, zmax=1.0,
                                              title=f"co-activation P(column | row), layer {layer}",
                                              zlabel="P(j|i)"), key="routing_coact")
    st.plotly_chart(charts.routing_heatmap(stats.domain_usage[layer], x=names, y=list(stats.domains),
                                           title=f"per-package expert usage, layer {layer}", zlabel="share"),
                    key="routing_domains")
    with st.expander("Most specialised tokens"):
        tok = stats.tokens[stats.tokens["layer"] == layer].sort_values(["share", "count"], ascending=False)
        st.dataframe(tok.head(50), hide_index=True, placeholder=MISSING, key="routing_tokens")
