"""Steering directions and hooks: extraction against hand computations and numpy/scipy references,
padding invariance, hooks that always come off, exact steering/ablation arithmetic, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from _support import assert_close_f32
from _tiny_llama import make_tiny_llama

from analysis.steering import extract as S
from analysis.steering.contrasts import load_contrasts, parse_contrasts
from analysis.errors import ConfigError, ShapeError
from analysis.sources import open_source
from analysis.steering.hooks import ablation, attached_hook_count, orthonormal_basis, project_out, steering
from analysis.steering.vectors import SteeringVector, from_extraction


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = make_tiny_llama(tmp_path_factory.mktemp("llama") / "m")
    src = open_source(d)
    return src, src.boot_bridge()


@pytest.fixture(scope="module")
def contrasts():
    return load_contrasts("numpy-torch")


def single_forward(bridge, text: str, name: str) -> torch.Tensor:
    """(pos, d_model) activations of one unpadded text (the independent path: no batch, no mask)."""
    ids, _ = S.tokenize(bridge, [text])
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=[name], return_type=None)
    return cache[name][0].to(torch.float64)


# ----------------------------------------------------------------------------- pure directions
def test_mean_difference_by_hand():
    pos = np.array([[1.0, 2.0, 0.0], [3.0, 4.0, 1.0]])
    neg = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(S.mean_difference(pos, neg), [2.0 - 1.0, 3.0 - 1.0, 0.5 - 1.0])


def test_pca_and_svd_directions_match_numpy(rng):
    pos, neg = rng.standard_normal((20, 6)) + [3, 0, 0, 0, 0, 0], rng.standard_normal((20, 6))
    d = pos - neg
    lam, vec = np.linalg.eigh(d.T @ d)  # second-moment matrix of the paired differences
    dirs, vals = S.svd_directions(pos, neg, 3)
    for i in range(3):
        want = vec[:, -1 - i] * np.sign(vec[:, -1 - i] @ d.mean(0))
        np.testing.assert_allclose(dirs[i], want, atol=1e-10)
    np.testing.assert_allclose(vals ** 2, lam[::-1][:3], rtol=1e-10)
    np.testing.assert_allclose(dirs @ dirs.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(S.pca_direction(pos, neg), dirs[0], atol=1e-12)
    assert S.pca_direction(pos, neg)[0] > 0.9  # the planted axis, positives higher


def test_logistic_direction_finds_the_planted_axis(rng):
    axis = np.zeros(8)
    axis[2] = 1.0
    pos, neg = rng.standard_normal((60, 8)) + 2 * axis, rng.standard_normal((60, 8))
    u = S.logistic_direction(pos, neg)
    assert np.isclose(np.linalg.norm(u), 1.0) and u @ axis > 0.9


def test_logistic_direction_matches_a_direct_scikit_learn_fit(rng):
    """Centring (the intercept absorbs it) and one global rescaling by s (the same as C/s² on the
    raw data) leave the direction of the L2 fit unchanged: a plain LogisticRegression on the raw
    activations with C = 1/s² gives the same unit vector."""
    from sklearn.linear_model import LogisticRegression

    pos, neg = rng.standard_normal((40, 6)) * 3 + [1, 0, 0.5, 0, 0, 2], rng.standard_normal((40, 6)) * 3 + 5
    x = np.concatenate([pos, neg])
    s = np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean())
    w = LogisticRegression(C=1 / s**2, tol=1e-12, max_iter=100_000).fit(x, np.r_[np.ones(40), np.zeros(40)]).coef_[0]
    np.testing.assert_allclose(S.logistic_direction(pos, neg), w / np.linalg.norm(w), atol=1e-5)


def test_projection_auc_equals_mann_whitney(rng):
    pos, neg, u = rng.standard_normal((15, 4)) + 0.5, rng.standard_normal((11, 4)), rng.standard_normal(4)
    u1 = mannwhitneyu(pos @ u, neg @ u).statistic
    assert S.projection_auc(pos, neg, u) == pytest.approx(u1 / (15 * 11), abs=1e-12)


def test_every_method_vector_projects_to_the_mean_separation(rng):
    pos, neg = rng.standard_normal((30, 5)) + [1, 2, 0, 0, 0], rng.standard_normal((30, 5))
    dbar = (pos - neg).mean(0)
    for method, v in S.direction_vectors(pos, neg).items():
        u = v / np.linalg.norm(v)
        assert v @ u == pytest.approx(dbar @ u, rel=1e-10), method


def test_direction_inputs_are_checked():
    with pytest.raises(ShapeError, match="same d_model"):
        S.mean_difference(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ShapeError, match="as many positives as negatives"):
        S.svd_directions(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(ShapeError, match="NaN or inf"):
        S.mean_difference(np.full((2, 2), np.nan), np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="must be distinct names from mean_diff, pca, logistic"):
        S.check_methods(["mean_diff", "lda"])


def test_a_layer_without_logistic_signal_gives_a_nan_row_and_a_warning(rng):
    """Layer 7's training pairs are identical (the fit returns a zero weight vector): its logistic
    row is NaN with a warning naming it; layer 3 and the other methods are unaffected."""
    from analysis.steering.contrasts import parse_contrasts

    cs = parse_contrasts("\n".join(f'{{"positive": "p{i}", "negative": "n{i}", "split": "{"test" if i < 4 else "train"}"}}'
                                    for i in range(16)))
    pos = rng.standard_normal((2, 16, 5))
    neg = pos.copy()
    neg[0] -= [2.0, 0, 0, 0, 0]  # layer 3: positives are shifted along axis 0
    neg[1, :4] -= 1.0  # layer 7: only the held-out pairs differ
    acts = S.Activations((3, 7), pos, neg, np.ones(2), np.full((2, 16), 4))
    with pytest.warns(RuntimeWarning, match=r"layer 7: the logistic direction could not be fitted .*zero weight"):
        ext = S.extract_directions(acts, cs)
    t = ext.table.set_index(["layer", "method"])
    assert np.isnan(t.loc[(7, "logistic"), "auc_test"]) and np.isnan(ext.vectors[2, 1]).all()
    assert t.loc[(3, "logistic"), "auc_test"] == 1.0 and ext.vector(3, "logistic")[0] > 0
    np.testing.assert_array_equal(ext.vector(7, "mean_diff"), 0.0)
    with pytest.raises(ConfigError, match="the logistic direction of layer 7 could not be fitted"):
        ext.vector(7, "logistic")
    assert ext.best_layer("logistic") == 3


# ----------------------------------------------------------------------------- positions
@pytest.mark.parametrize("spec", ["last", "mean", "index:0", "index:-2", 1])
def test_positions_are_found_under_left_and_right_padding(spec, rng):
    lengths = [5, 2, 4]
    acts = [torch.tensor(rng.standard_normal((n, 3))) for n in lengths]
    rule = S.PositionRule.parse(spec)
    want = torch.stack([a.mean(0) if rule.kind == "mean" else a[-1 if rule.kind == "last" else rule.index]
                        for a in acts])
    for side in ("right", "left"):
        padded, mask = torch.full((3, 5, 3), 99.0, dtype=torch.float64), torch.zeros((3, 5), dtype=torch.long)
        for i, a in enumerate(acts):
            sl = slice(0, len(a)) if side == "right" else slice(5 - len(a), 5)
            padded[i, sl], mask[i, sl] = a, 1
        torch.testing.assert_close(S.select_positions(padded, mask, rule), want, atol=0, rtol=0)


def test_position_errors():
    with pytest.raises(ConfigError, match="use last, mean or index:K"):
        S.PositionRule.parse("first")
    with pytest.raises(ConfigError, match="index:5 is outside text 0, which has 2 tokens"):
        S.select_positions(torch.zeros((1, 3, 2)), torch.tensor([[1, 1, 0]]), "index:5")


# ----------------------------------------------------------------------------- on a bridge
def test_hook_names_match_the_bridge_and_errors_list_the_valid_ones(llama):
    _, bridge = llama
    for hook in S.HOOKS:
        assert S.hook_name(bridge, 1, hook) in bridge.hook_dict
    with pytest.raises(ConfigError, match="unknown hook 'resid'; choose one of resid_pre, resid_mid, resid_post"):
        S.hook_name(bridge, 0, "resid")
    with pytest.raises(ConfigError, match=r"layer 2 does not exist: this model has layers 0\.\.1"):
        S.hook_name(bridge, 2, "resid_post")
    with pytest.raises(ConfigError, match=r"layers 0\.\.1"):
        S.check_layers(bridge, [-1])


@pytest.mark.parametrize("position", ["last", "mean"])
def test_mean_difference_matches_unbatched_hand_computation(llama, contrasts, position):
    _, bridge = llama
    ext = S.extract(bridge, contrasts, hook="resid_post", position=position, layers=[1], padding_side="left")
    name = "blocks.1.hook_resid_post"

    def reduce(text):
        a = single_forward(bridge, text, name)
        return a.mean(0) if position == "mean" else a[-1]

    pos = torch.stack([reduce(p.positive) for p in contrasts.train]).numpy()
    neg = torch.stack([reduce(p.negative) for p in contrasts.train]).numpy()
    assert_close_f32(ext.vector(1, "mean_diff"), pos.mean(0) - neg.mean(0))
    row = ext.table[(ext.table.method == "mean_diff")].iloc[0]
    assert row["norm"] == pytest.approx(np.linalg.norm(pos.mean(0) - neg.mean(0)), rel=1e-4)


def test_activations_do_not_depend_on_the_padding_side(llama, contrasts):
    _, bridge = llama
    right = S.collect(bridge, contrasts, hook="attn_out", position="mean", padding_side="right")
    left = S.collect(bridge, contrasts, hook="attn_out", position="mean", padding_side="left")
    assert_close_f32(left.pos, right.pos, per_leading_index=True)
    assert_close_f32(left.neg, right.neg, per_leading_index=True)
    np.testing.assert_allclose(left.act_norm, right.act_norm, rtol=1e-5)


def test_act_norm_and_rel_norm_match_a_hand_computation(llama, contrasts):
    """act_norm = mean ‖h‖ over every real token of every text (both sides, both splits), one
    text at a time; rel_norm = ‖mean_diff‖ / act_norm."""
    _, bridge = llama
    cs = parse_contrasts("\n".join(json.dumps({"positive": p.positive, "negative": p.negative, "split": p.split})
                                    for p in contrasts.pairs[-16:]))  # 12 held-out + 4 training pairs
    ext = S.extract(bridge, cs, hook="mlp_out", position="last", layers=[0], padding_side="left")
    acts = {t: single_forward(bridge, t, "blocks.0.hook_mlp_out") for p in cs.pairs for t in (p.positive, p.negative)}
    act_norm = float(torch.cat([a.norm(dim=-1) for a in acts.values()]).mean())
    row = ext.table.set_index("method").loc["mean_diff"]
    assert row["act_norm"] == pytest.approx(act_norm, rel=1e-5)
    diff = torch.stack([acts[p.positive][-1] - acts[p.negative][-1] for p in cs.train]).mean(0)
    assert row["rel_norm"] == pytest.approx(float(diff.norm()) / act_norm, rel=1e-4)


@pytest.mark.parametrize("position", ["mean", "last"])
def test_minilm_activations_do_not_depend_on_the_padding_side(minilm_bridge, position):
    cs = load_contrasts("positive-negative")
    right = S.collect(minilm_bridge, cs, hook="resid_mid", position=position, padding_side="right", layers=[0, 5])
    left = S.collect(minilm_bridge, cs, hook="resid_mid", position=position, padding_side="left", layers=[0, 5])
    assert (right.lengths[0] != right.lengths[1]).any()  # the texts really are padded
    # Padding changes the GEMM shapes, so float32 summation order: the bound is 64 eps32 of each layer's largest
    # |activation| (~7.6e-6 relative; measured worst ~6 eps32, 1.24e-5 on values near 16 under load), per layer
    # because layer 0's scale is 3x layer 5's. A padded token leaking into attention moves values by >= 1e-2.
    assert_close_f32(left.pos, right.pos, per_leading_index=True)
    assert_close_f32(left.neg, right.neg, per_leading_index=True)
    np.testing.assert_allclose(left.act_norm, right.act_norm, rtol=1e-5)
    text = cs.test[0].negative  # and both equal the text run alone
    alone = single_forward(minilm_bridge, text, "blocks.5.hook_resid_mid")
    want = alone.mean(0) if position == "mean" else alone[-1]
    assert_close_f32(left.neg[1, len(cs.train)], want.numpy())


def test_extraction_table_and_shapes(llama, contrasts):
    _, bridge = llama
    ext = S.extract(bridge, contrasts, k=3)
    assert ext.vectors.shape == (3, 2, bridge.cfg.d_model) and ext.svd_directions.shape == (2, 3, bridge.cfg.d_model)
    assert not ext.vectors.flags.writeable
    assert list(ext.table.columns) == ["layer", "method", "auc_test", "auc_train", "pair_acc_test", "norm", "act_norm",
                                       "rel_norm", "cos_mean_diff"]
    assert ext.table["auc_test"].between(0, 1).all() and (ext.table["rel_norm"] > 0).all()
    np.testing.assert_allclose(ext.table["rel_norm"], ext.table["norm"] / ext.table["act_norm"])
    assert ext.meta["n_train"] == 36 and ext.meta["n_test"] == 12 and ext.meta["position"] == "last"
    assert ext.best_layer() in (0, 1)


def test_index_rule_refuses_pairs_of_unequal_token_length(llama, contrasts):
    _, bridge = llama
    tok = bridge.tokenizer
    bos = int(tok("a")["input_ids"][0] != tok.bos_token_id)  # the BOS token extraction prepends, if the tokenizer does not
    n_tokens = [(len(tok(p.positive)["input_ids"]) + bos, len(tok(p.negative)["input_ids"]) + bos)
                for p in contrasts.pairs]
    bad = [(p.id, a, b) for p, (a, b) in zip(contrasts.pairs, n_tokens) if a != b]
    assert bad
    with pytest.raises(ConfigError, match=rf"index:0 compares the same token slot .* {len(bad)} pair\(s\) differ in "
                                          rf"token length: {bad[0][0]} \({bad[0][1]} vs {bad[0][2]} tokens\)"):
        S.extract(bridge, contrasts, position="index:0")
    same = parse_contrasts("\n".join(f'{{"positive": "a tensor {i}", "negative": "a array {i}"}}' for i in range(8)))
    ext = S.extract(bridge, same, position="index:-1", layers=[0])
    assert np.isfinite(ext.vectors).all()
    with pytest.raises(ConfigError, match=r"position index:0 gives both texts of every pair identical activations at "
                                          r"resid_post of every layer .* \(index:0 on a causal LM is the BOS token\).*"
                                          r"use position last or mean"):
        S.extract(bridge, same, position="index:0")
    assert S.collect(bridge, same, position="index:2", layers=[1]).pos.shape == (1, 8, bridge.cfg.d_model)


# ----------------------------------------------------------------------------- hooks
def test_steering_adds_exactly_alpha_v_and_hooks_come_off(llama, contrasts):
    _, bridge = llama
    ids, mask = S.tokenize(bridge, contrasts.texts("test")[0][:3])
    v = np.random.default_rng(1).standard_normal(bridge.cfg.d_model).astype(np.float32)
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    with torch.no_grad():
        _, plain = bridge.run_with_cache(ids, attention_mask=mask, names_filter=names, return_type=None)
        with steering(bridge, v, alpha=2.5, layers=[0], hook="resid_post"):
            assert attached_hook_count(bridge) == 1
            _, steered = bridge.run_with_cache(ids, attention_mask=mask, names_filter=names, return_type=None)
    assert attached_hook_count(bridge) == 0
    assert_close_f32(steered["blocks.1.hook_resid_pre"], plain["blocks.0.hook_resid_post"] + 2.5 * torch.tensor(v))


def test_norm_scaled_steering_adds_alpha_times_the_token_norm(llama):
    _, bridge = llama
    ids, mask = S.tokenize(bridge, ["np.zeros(3)", "a tensor"])
    v = np.random.default_rng(2).standard_normal(bridge.cfg.d_model).astype(np.float32)
    with torch.no_grad():
        _, plain = bridge.run_with_cache(ids, attention_mask=mask, names_filter=["blocks.0.hook_resid_post"],
                                         return_type=None)
        with steering(bridge, v, alpha=-0.3, layers=[0], scale="norm"):
            _, got = bridge.run_with_cache(ids, attention_mask=mask, names_filter=["blocks.1.hook_resid_pre"],
                                           return_type=None)
    h = plain["blocks.0.hook_resid_post"]
    want = h - 0.3 * h.norm(dim=-1, keepdim=True) * torch.tensor(v / np.linalg.norm(v))
    assert_close_f32(got["blocks.1.hook_resid_pre"], want)


@pytest.mark.parametrize("which", ["steering", "ablation"])
def test_hooks_are_removed_when_the_block_raises(llama, which):
    _, bridge = llama
    ids, _ = S.tokenize(bridge, ["Return a tensor."])
    with torch.no_grad():
        before = bridge(ids)
    v = np.ones(bridge.cfg.d_model, dtype=np.float32)
    ctx = steering(bridge, v, alpha=3.0, layers=[0, 1]) if which == "steering" else ablation(bridge, v)
    with pytest.raises(RuntimeError, match="boom"):
        with ctx:
            assert attached_hook_count(bridge) > 0
            raise RuntimeError("boom")
    assert attached_hook_count(bridge) == 0
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), before, atol=0, rtol=0)


def test_hooks_attached_before_survive_the_context(llama):
    _, bridge = llama
    mine = bridge.hook_dict["blocks.0.hook_mlp_out"]
    mine.add_hook(lambda x, hook: x)
    try:
        with steering(bridge, np.ones(bridge.cfg.d_model), alpha=1.0, layers=[0]):
            pass
        assert attached_hook_count(bridge) == 1
    finally:
        mine.remove_hooks()
    assert attached_hook_count(bridge) == 0


def test_ablation_removes_the_direction_from_the_residual_stream(llama):
    _, bridge = llama
    r = np.random.default_rng(3).standard_normal((2, bridge.cfg.d_model))
    basis = orthonormal_basis(r, bridge.cfg.d_model)
    ids, mask = S.tokenize(bridge, ["Compute the sum of the tensor.", ">>> np.eye(3)"])
    with torch.no_grad(), ablation(bridge, r):
        _, cache = bridge.run_with_cache(ids, attention_mask=mask, return_type=None,
                                         names_filter=[f"blocks.{i}.hook_resid_{w}" for i in (0, 1) for w in ("pre", "post")])
    for name, h in cache.items():
        assert float((h.to(torch.float64) @ basis.T).abs().max()) < 1e-5, name
    x = torch.tensor(np.random.default_rng(4).standard_normal((5, bridge.cfg.d_model)))
    torch.testing.assert_close(project_out(project_out(x, basis), basis), project_out(x, basis))


@pytest.fixture(scope="module")
def minilm_bridge(minilm):
    return minilm.boot_bridge()


def test_ablation_on_a_post_norm_encoder_clears_every_resid_hook(minilm_bridge):
    """BERT re-normalises after each residual add (LayerNorm's centring, gain and bias bring a
    projected direction back), so the ablation also projects after every LayerNorm: h·r̂ = 0 at
    every resid hook of every layer, relative to |h|."""
    from analysis.steering.hooks import is_post_norm, residual_sites, writer_sites

    bridge = minilm_bridge
    assert is_post_norm(bridge) and set(writer_sites(bridge)) - {"hook_pos_embed"} < set(residual_sites(bridge))
    r = np.random.default_rng(6).standard_normal((2, bridge.cfg.d_model))
    basis = orthonormal_basis(r, bridge.cfg.d_model)
    ids, mask = S.tokenize(bridge, ["What a wonderful, generous idea.", "This is awful and broken.", "ok"])
    names = ["hook_embed"] + [S.hook_name(bridge, layer, h) for layer in range(bridge.cfg.n_layers)
                              for h in ("resid_pre", "resid_mid", "resid_post", "attn_out")]

    def components(ctx):
        with torch.no_grad(), ctx:
            _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=names, return_type=None)
        real = mask.bool()
        return {n: ((h.to(torch.float64) @ basis.T).norm(dim=-1) / h.to(torch.float64).norm(dim=-1))[real]
                for n, h in cache.items()}

    from contextlib import nullcontext

    plain = components(nullcontext())
    assert all(float(c.max()) > 1e-3 for c in plain.values())  # the directions are there to remove
    ablated = components(ablation(bridge, r))
    assert attached_hook_count(bridge) == 0
    for name, c in ablated.items():
        assert float(c.max()) <= 1e-5, (name, float(c.max()))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"alpha": float("nan")}, ConfigError, "alpha=nan must be a finite number"),
    ({"alpha": float("inf")}, ConfigError, "alpha=inf must be a finite number"),
    ({"alpha": "4"}, ConfigError, "alpha='4' must be a finite number"),
    ({"alpha": 1.0, "scale": "relative"}, ConfigError, "scale='relative' must be one of absolute, norm"),
    ({"alpha": 1.0, "hook": "resid"}, ConfigError, "unknown hook 'resid'"),
    ({"alpha": 1.0, "layers": [7]}, ConfigError, r"layer 7 does not exist: this model has layers 0\.\.1"),
])
def test_bad_steering_arguments_raise_before_any_hook(llama, kwargs, error, match):
    _, bridge = llama
    kwargs = {"layers": [0], **kwargs}
    with pytest.raises(error, match=match):
        with steering(bridge, np.ones(bridge.cfg.d_model), **kwargs):
            pass
    assert attached_hook_count(bridge) == 0


def test_vectors_from_another_model_are_refused(llama):
    src, bridge = llama
    wide = SteeringVector(np.ones((1, 384)), (0,), fingerprint="f" * 32, source="minilm")
    with pytest.raises(ShapeError, match="d_model 384 but the model's d_model is 32: it comes from another model"):
        with steering(bridge, wide, alpha=1.0):
            pass
    foreign = SteeringVector(np.ones((1, 32)), (0,), fingerprint="f" * 32, source="other")
    with pytest.raises(ConfigError, match="extracted from model ffffffffffff"):
        with steering(bridge, foreign, alpha=1.0, fingerprint=src.fingerprint):
            pass
    with steering(bridge, foreign, alpha=1.0, fingerprint=src.fingerprint, allow_foreign=True):
        assert attached_hook_count(bridge) == 1
    with pytest.raises(ShapeError, match=r"shape \(d_model,\) = \(32,\)"):
        with steering(bridge, np.ones(33), alpha=1.0, layers=[0]):
            pass
    assert attached_hook_count(bridge) == 0


def test_ablation_checks_the_vector_fingerprint_against_the_model(llama):
    from analysis.steering.hooks import bridge_fingerprint

    src, bridge = llama
    assert bridge_fingerprint(bridge) == src.fingerprint  # from the directory the bridge was booted from
    r = np.random.default_rng(7).standard_normal((1, bridge.cfg.d_model))
    foreign = SteeringVector(r, (0,), fingerprint="f" * 32, source="other")
    with pytest.raises(ConfigError, match=r"extracted from model ffffffffffff \(other\), not from this model"):
        with ablation(bridge, foreign):
            pass  # pragma: no cover
    assert attached_hook_count(bridge) == 0
    with ablation(bridge, foreign, allow_foreign=True):
        assert attached_hook_count(bridge) > 0
    with ablation(bridge, SteeringVector(r, (0,), fingerprint=src.fingerprint)), ablation(bridge, r):
        assert attached_hook_count(bridge) > 0
    with pytest.raises(ShapeError, match="d_model 384 but the model's d_model is 32"):
        with ablation(bridge, SteeringVector(np.ones((1, 384)), (0,))):
            pass  # pragma: no cover
    assert attached_hook_count(bridge) == 0


def test_multi_layer_vector_applies_at_its_own_layers(llama, contrasts):
    _, bridge = llama
    ext = S.extract(bridge, contrasts)
    vec = from_extraction(ext, [0, 1])
    with steering(bridge, vec, alpha=1.0):
        assert attached_hook_count(bridge) == 2
    with steering(bridge, vec, alpha=1.0, layers=[1]):
        assert attached_hook_count(bridge) == 1
    deeper = SteeringVector(np.ones((2, bridge.cfg.d_model)), (0, 5))
    with pytest.raises(ConfigError, match=r"layer 5 does not exist"):
        with steering(bridge, deeper, alpha=1.0):
            pass  # pragma: no cover
    assert attached_hook_count(bridge) == 0
