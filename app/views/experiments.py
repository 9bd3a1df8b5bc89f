"""Experiments page: stored KappaTune experiments (``lenslab experiment kappatune``, parameter-matched;
and the first design, ``lenslab experiment forgetting``).

Read-only: shows the per-arm summary (matched design: mean with bootstrap 95% intervals, the paired
comparison of lowest κ against each control, the Pareto plot of task gain vs forgetting; first design:
drift vs accuracy with error bars), and every run; the
experiment itself runs from the CLI or ``app.api.experiment_kappatune`` (minutes of CPU). The picker
lists the stored entries from the index (their settings are the key's params); only the picked one is read.
"""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import streamlit as st

from analysis.errors import LensLabError
from app import api
from app.experiment_charts import ARM_LABELS, forgetting_scatter, pareto_plot
from app.state import MISSING, get_store, link_model, pick_index, picked, remembered_model

store = get_store()
st.title("Experiments")
st.subheader("KappaTune: does lowest-κ fine-tuning forget less?")

entries = api.stored_experiments(store=store)
if not entries:
    st.info("No KappaTune experiment stored yet. Run `lenslab experiment kappatune` in a terminal "
            "(a few minutes on 2 cores), or `app.api.experiment_kappatune('minilm')` in a notebook.")
    st.stop()

models = store.models()
labels = {m.fingerprint: m.label for m in models}


def describe(i: int) -> str:
    entry = entries[i]
    c = entry.params
    when = datetime.fromtimestamp(entry.created).strftime("%Y-%m-%d %H:%M")
    design = "matched" if "tol" in c else "first design"
    return (f"{labels.get(entry.fingerprint, entry.fingerprint[:8])} · {design} · budget {c.get('budget')} · "
            f"{c.get('seeds')} seed(s) · {c.get('steps')} steps{' · bf16' if c.get('autocast') else ''} · {when}")


opens_on = remembered_model([e.fingerprint for e in entries], models)  # newest experiment of the chosen model
pick = st.selectbox("Stored experiment", range(len(entries)), format_func=describe, key="experiment_pick",
                    index=pick_index("experiment_pick", range(len(entries)),
                                     next((i for i, e in enumerate(entries) if e.fingerprint == opens_on), None)),
                    on_change=picked, args=("experiment_pick", lambda i: entries[i].fingerprint))
link_model(entries[pick].fingerprint)
try:
    res = api.load_experiment(entries[pick].key, store=store)
except LensLabError as exc:  # corrupt, or deleted since the listing
    st.error(str(exc))
    st.stop()
cfg, summary, runs = res.config, res.summary, res.runs


def interval(mean: float, lo: float, hi: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


if hasattr(res, "paired"):  # the parameter-matched design (KappaTuneResult)
    units = res.meta.get("units", {})
    st.caption(f"Task: {res.meta.get('task')} on {res.meta.get('label') or 'the model'}; budget {cfg.get('budget')} "
               f"(target {res.meta.get('target', 0):,} trained parameters, matched arms within ±{cfg.get('tol', 0):.0%}); "
               f"{cfg.get('steps')} steps, batch {cfg.get('batch_size')}. Gain = {units.get('gain')}; "
               f"forgetting = {units.get('forgetting')}. Mean over seeds [bootstrap 95% interval].")
    matched = runs.groupby("arm", sort=False)["matched"].all()
    st.dataframe(pd.DataFrame({
        "arm": [ARM_LABELS.get(a, a) for a in summary["arm"]],
        "trained params": summary["n_params_mean"].round().astype(int),
        "matched": [bool(matched.get(a)) for a in summary["arm"]],
        "task gain": [interval(m, lo, hi) for m, lo, hi in zip(summary["gain_mean"], summary["gain_lo"],
                                                                summary["gain_hi"])],
        "forgetting": [interval(m, lo, hi) for m, lo, hi in zip(summary["forgetting_mean"], summary["forgetting_lo"],
                                                                 summary["forgetting_hi"])],
        "seeds": summary["n_seeds"],
    }), hide_index=True, placeholder=MISSING, key="experiment_summary",
        column_config={"trained params": st.column_config.NumberColumn(format="localized")})
    st.plotly_chart(pareto_plot(summary, runs, res.meta), key="experiment_pareto")
    if not res.paired.empty:
        p = res.paired
        st.markdown("**Lowest κ minus each control**, seed by seed (negative Δ forgetting: lowest κ forgot less)")
        st.dataframe(pd.DataFrame({
            "control": [ARM_LABELS.get(a, a) for a in p["control"]],
            "Δ gain": [interval(m, lo, hi) for m, lo, hi in zip(p["gain_diff"], p["gain_diff_lo"], p["gain_diff_hi"])],
            "Δ forgetting": [interval(m, lo, hi) for m, lo, hi in zip(p["forgetting_diff"], p["forgetting_diff_lo"],
                                                                     p["forgetting_diff_hi"])],
            "forgot less": [f"{a}/{n}" for a, n in zip(p["forgets_less"], p["n_seeds"])],
            "gained more": [f"{a}/{n}" for a, n in zip(p["gains_more"], p["n_seeds"])],
        }), hide_index=True, placeholder=MISSING, key="experiment_paired")
    with st.expander(f"All {len(runs)} runs"):
        st.dataframe(runs, hide_index=True, placeholder=MISSING, key="experiment_runs")
    with st.expander("Settings (store key parameters)"):
        st.json(cfg)
    st.stop()

st.caption(
    f"Task: which package a docstring comes from ({', '.join(res.meta.get('classes', []))}); "
    f"{res.meta.get('n_train')} train / {res.meta.get('n_test')} test texts, max {cfg.get('max_tokens')} tokens. "
    f"Forgetting on {res.meta.get('n_heldout')} held-out docstrings of "
    f"{', '.join(res.meta.get('heldout_packages', []))}. AdamW, lr {cfg.get('lr')} (head {cfg.get('head_lr')}), "
    f"batch {cfg.get('batch_size')}. Selection arms train only the chosen weight matrices (biases and LayerNorms "
    "frozen); full trains every encoder parameter; head only trains no encoder parameter.")


def pm(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}")


table = pd.DataFrame({
    "arm": [ARM_LABELS.get(a, a) for a in summary["arm"]],
    "tensors": summary["n_tensors_mean"].round().astype(int),
    "trained params": summary["n_params_mean"].round().astype(int),
    "accuracy": [pm(m, s, 3) for m, s in zip(summary["accuracy_mean"], summary["accuracy_std"])],
    "drift (1 − cos)": [pm(m, s, 4) for m, s in zip(summary["drift_mean"], summary["drift_std"])],
    "similarity Spearman": [pm(m, s, 4) for m, s in zip(summary["spearman_mean"], summary["spearman_std"])],
    "seeds": summary["n_seeds"],
})
st.dataframe(table, hide_index=True, placeholder=MISSING, key="experiment_summary",
             column_config={"trained params": st.column_config.NumberColumn(format="localized")})
st.plotly_chart(forgetting_scatter(summary, runs), key="experiment_scatter")
st.caption("Drift: mean over held-out texts of 1 − cos(embedding before, after). Similarity Spearman: rank "
           "correlation of all pairwise cosine similarities before vs after (1 = structure kept). "
           "Selection arms share a tensor budget, not a parameter budget: compare the trained-params column.")
with st.expander(f"All {len(runs)} runs"):
    st.dataframe(runs, hide_index=True, placeholder=MISSING, key="experiment_runs")
with st.expander("Settings (store key parameters)"):
    st.json(cfg)
