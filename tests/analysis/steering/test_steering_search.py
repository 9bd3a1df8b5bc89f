"""The steering search: bad input refused before a model boots; the Pareto front, the budget and the cache;
the numbers against independent computations (KL one text at a time in float64, the exported vector through
the existing steering hooks, an SAE feature added at hook_z itself).

Independent truths: a brute-force dominance check; a per-text, unpadded, float64 KL and concept-margin
computation with an explicit hook; ``analysis.steering.hooks.steering`` with the exported SteeringVector (what
``steer apply`` attaches); adding the SAE decoder row to ``hook_z`` directly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from _tiny_llama import make_tiny_llama

from analysis import model_cache
from analysis.errors import ConfigError
from analysis.sources import open_source
from analysis.steering import pipeline_search as ps
from analysis.steering import search_measure as sm
from analysis.steering import search_opt as so
from analysis.steering.contrasts import load_contrasts
from analysis.steering.vectors import load_vector
from analysis.store import Result


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("steer-search") / "llama")


@pytest.fixture
def no_boot(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was booted before the input was validated")

    monkeypatch.setattr(model_cache, "bridge", boom)


def _pairs_file(path, n):
    lines = [json.dumps({"positive": f"torch tensor number {i}", "negative": f"numpy array number {i}",
                         "split": "test" if i % 2 else "train", "id": str(i)}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------ bad input
def test_a_contrast_set_with_fewer_than_four_pairs_is_refused(lm_dir, store, no_boot, tmp_path):
    with pytest.raises(ConfigError, match=r"has 3 pairs; a search needs at least 4"):
        ps.steer_search(lm_dir, _pairs_file(tmp_path / "three.jsonl", 3), store=store, device="cpu")


def test_a_layer_outside_the_model_is_refused(lm_dir, store, no_boot):
    with pytest.raises(ConfigError, match=r"layer 7 is outside .* layers 0\.\.1"):
        ps.steer_search(lm_dir, "numpy-torch", layers=[0, 7], store=store, device="cpu")


@pytest.mark.parametrize("strengths", [(0.2, 1.0), (-1.0, -0.1)], ids=str)
def test_a_strength_range_without_zero_is_refused(lm_dir, store, no_boot, strengths):
    with pytest.raises(ConfigError, match=r"does not contain 0"):
        ps.steer_search(lm_dir, "numpy-torch", strengths=strengths, store=store, device="cpu")


@pytest.mark.parametrize("budget", [0, -3, 5], ids=str)
def test_a_budget_of_zero_or_below_one_setting_per_line_is_refused(lm_dir, store, no_boot, budget):
    with pytest.raises(ConfigError, match=r"budget"):
        ps.steer_search(lm_dir, "numpy-torch", budget=budget, store=store, device="cpu")


def _fake_sae(store, src, layer, d_in, seed=0):
    w_dec = np.random.default_rng(seed).standard_normal((8, d_in)).astype(np.float32)
    info = store.put(src.fingerprint, "sae", {"layer": layer, "seed": seed}, "test",
                     Result(arrays={"W_dec": w_dec}, meta={"cfg": {"hook_name": f"blocks.{layer}.attn.hook_z"}}))
    return info.key, w_dec


def test_an_sae_whose_hook_does_not_match_the_site_is_refused(lm_dir, store, no_boot):
    src = open_source(lm_dir)
    key, _ = _fake_sae(store, src, 1, 32)
    with pytest.raises(ConfigError, match=r"reads blocks\.1\.attn\.hook_z.*attn_out of layer 1.*--site attn_out"):
        ps.steer_search(lm_dir, "numpy-torch", sources=[f"sae:{key[:12]}:0"], site="resid_post", store=store,
                        device="cpu")
    with pytest.raises(ConfigError, match=r"include --layers 1"):
        ps.steer_search(lm_dir, "numpy-torch", sources=[f"sae:{key[:12]}:0"], site="attn_out", layers=[0],
                        store=store, device="cpu")


@pytest.mark.parametrize("spec", ["svd", "sae:abc", "file:", "bilinear:k:1"], ids=str)
def test_an_unknown_source_spec_is_refused(lm_dir, store, no_boot, spec):
    with pytest.raises(ConfigError, match=r"direction source"):
        ps.steer_search(lm_dir, "numpy-torch", sources=[spec], store=store, device="cpu")


# ------------------------------------------------------------------------------------------ optimiser
def test_pareto_mask_matches_brute_force(rng):
    effect, side = rng.standard_normal(60), rng.random(60)
    effect[5], side[5] = effect[3], side[3]  # a tie is kept on both
    for origin in (False, True):
        mask = so.pareto_mask(effect, side, origin=origin)
        e, s = (np.r_[effect, 0.0], np.r_[side, 0.0]) if origin else (effect, side)
        for i in range(60):
            beaten = any(e[j] >= effect[i] and s[j] <= side[i] and (e[j] > effect[i] or s[j] < side[i])
                         for j in range(len(e)))
            assert mask[i] == (not beaten)
    assert not so.pareto_mask(effect, side)[effect <= 0].any()  # the unsteered model beats every loss


def test_a_larger_budget_extends_the_sequence_of_settings():
    def evaluate(source, layer, alpha, stage):
        return {"source": source, "layer": layer, "alpha": alpha, "stage": stage,
                "effect": np.tanh(alpha) * (layer + 1), "kl": alpha ** 2 * (2 - layer)}

    lines = [("a", 0), ("a", 1), ("b", 1)]
    small = so.optimise(lines, -1.0, 2.0, 20, 4, evaluate, "kl", 0.3)
    large = so.optimise(lines, -1.0, 2.0, 35, 4, evaluate, "kl", 0.3)
    assert len(small) == 20 and len(large) == 35 and large[:20] == small
    assert {r["stage"] for r in large[12:]} == {"refine"}


# ------------------------------------------------------------------------------------------ the search
@pytest.fixture(scope="module")
def searched(lm_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("search-store")
    res = ps.steer_search(lm_dir, "numpy-torch", budget=60, n_coarse=3, store=store, device="cpu")
    return store, res


def test_the_search_stays_in_its_budget_and_marks_the_front_and_choice(searched):
    _, res = searched
    t, m = res.table, res.meta
    assert m["passes_used"] <= m["budget"]
    assert m["passes_used"] == m["baseline_passes"] + len(t) * m["passes_per_setting"]
    assert len(t) == m["n_settings_budget"]  # the whole budget was spent
    assert set(t["source"]) == {"mean_diff", "pca", "logistic"} and set(t["layer"]) == {0, 1}
    assert (t["stage"] == "refine").any() and (t["alpha"].between(-1, 1)).all()
    assert np.array_equal(t["on_front"].to_numpy(), so.pareto_mask(t["effect"].to_numpy(), t["kl"].to_numpy()))
    chosen = t[t["chosen"]].iloc[0]
    ok = t[t["kl"] <= m["max_side"]]
    assert chosen["effect"] == ok["effect"].max() and chosen["kl"] <= m["max_side"]
    assert res.chosen["layer"] == chosen["layer"] and res.chosen["alpha"] == chosen["alpha"]


def test_a_rerun_with_a_larger_budget_computes_only_new_settings(lm_dir, searched):
    store, res = searched
    again = ps.steer_search(lm_dir, "numpy-torch", budget=60, n_coarse=3, store=store, device="cpu")
    pd.testing.assert_frame_equal(again.table, res.table)
    bigger = ps.steer_search(lm_dir, "numpy-torch", budget=80, n_coarse=3, store=store, device="cpu")
    n_new = len(bigger.table) - len(res.table)
    assert n_new == 10 and bigger.meta["settings_computed"] == n_new
    cols = ["source", "layer", "alpha", "effect", "kl"]
    pd.testing.assert_frame_equal(bigger.table[cols].iloc[:len(res.table)], res.table[cols])


def _direct(bridge, texts, hooks, pos_ids, neg_ids):
    """Per text, unpadded, float64: (mean concept margin, mean KL, mean nll) over real positions."""
    margins, kls, nlls, n, n_next = 0.0, 0.0, 0.0, 0, 0
    for text in texts:
        ids = torch.tensor([[bridge.tokenizer.bos_token_id, *bridge.tokenizer(text, add_special_tokens=False)
                             ["input_ids"]][:64]])
        with torch.no_grad():
            p0 = torch.log_softmax(bridge(ids, return_type="logits")[0].double(), -1)
            with bridge.hooks(fwd_hooks=hooks, reset_hooks_end=True):
                p1 = torch.log_softmax(bridge(ids, return_type="logits")[0].double(), -1)
        m = lambda p: torch.logsumexp(p[:, pos_ids], -1) - torch.logsumexp(p[:, neg_ids], -1)  # noqa: E731
        margins += float((m(p1) - m(p0)).sum())
        kls += float((p0.exp() * (p0 - p1)).sum())
        nlls += float((-p1[:-1].gather(-1, ids[0, 1:, None]) + p0[:-1].gather(-1, ids[0, 1:, None])).sum())
        n += ids.shape[1]
        n_next += ids.shape[1] - 1
    return margins / n, kls / n, nlls / n_next


def test_effect_and_kl_match_a_direct_computation_and_the_exported_vector_reproduces_them(lm_dir, searched,
                                                                                            tmp_path):
    store, res = searched
    out = tmp_path / "chosen.safetensors"
    ps.steer_search_export(res, out)
    vec = load_vector(out)
    c = res.chosen
    assert vec.layers == (c["layer"],) and vec.hook == "resid_post" and vec.meta["alpha"] == c["alpha"]
    bridge = open_source(lm_dir).boot_bridge()
    cs = load_contrasts("numpy-torch")
    tok = bridge.tokenizer
    pos_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in cs.concept_positive]
    neg_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in cs.concept_negative]
    from analysis.steering.hooks import steering_hooks  # what `steer apply` attaches (hooks.steering)

    apply_hooks = steering_hooks(bridge, vec, alpha=vec.meta["alpha"])
    test_pos, test_neg = cs.texts("test")
    effect, _, _ = _direct(bridge, test_pos + test_neg, apply_hooks, pos_ids, neg_ids)
    neutral = ps.neutral_texts(ps.NEUTRAL, 32)
    _, kl, nll = _direct(bridge, neutral, apply_hooks, pos_ids, neg_ids)
    row = res.table[res.table["chosen"]].iloc[0]
    assert effect == pytest.approx(row["effect"], rel=1e-5, abs=1e-7)
    assert kl == pytest.approx(row["kl"], rel=1e-5, abs=1e-9)
    assert nll == pytest.approx(row["nll_delta"], rel=1e-4, abs=1e-7)


def test_a_file_source_holding_the_mean_difference_scores_as_the_mean_difference(lm_dir, store, tmp_path):
    from app import api

    ext = api.steer_extract(lm_dir, "numpy-torch", store=store, device="cpu")
    api.save_steering_vector(api.steer_vector(ext, layer=1), tmp_path / "md.safetensors")
    res = ps.steer_search(lm_dir, "numpy-torch", sources=["mean_diff", f"file:{tmp_path / 'md.safetensors'}"],
                          layers=[1], budget=30, n_coarse=3, store=store, device="cpu")
    t = res.table.set_index(["alpha", "source"]).sort_index()
    a = t.xs("mean_diff", level="source")
    b = t.xs(f"file:{tmp_path / 'md.safetensors'}", level="source")
    common = a.index.intersection(b.index)
    assert len(common) >= 3
    a, b = a.loc[common], b.loc[common]
    np.testing.assert_allclose(b["effect"], a["effect"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b["kl"], a["kl"], rtol=1e-4, atol=1e-8)


def test_an_sae_feature_equals_adding_its_decoder_row_at_hook_z(lm_dir, store):
    src = open_source(lm_dir)
    key, w_dec = _fake_sae(store, src, 1, 32, seed=3)
    res = ps.steer_search(lm_dir, "numpy-torch", sources=[f"sae:{key[:12]}:2"], site="attn_out", layers=[1],
                          budget=12, n_coarse=2, store=store, device="cpu")
    row = res.table.iloc[0]
    bridge = open_source(lm_dir).boot_bridge()
    w_o = src.tensor("model.layers.1.self_attn.o_proj.weight").double().numpy()
    n_l = res.meta["mean_norms"]["1"]
    d = w_dec[2].astype(np.float64) * row["alpha"] * n_l / np.linalg.norm(w_o @ w_dec[2])
    z_add = torch.tensor(d, dtype=torch.float32).reshape(4, 8)

    def at_z(z, hook=None):
        return z + z_add.to(z.dtype)

    cs = load_contrasts("numpy-torch")
    base = sm.lm_baseline(bridge, sum(cs.texts("test"), []), ps.neutral_texts(ps.NEUTRAL, 32),
                          concept_pos=cs.concept_positive, concept_neg=cs.concept_negative)
    direct = sm.lm_score(bridge, base, [("blocks.1.attn.hook_z", at_z)])
    assert direct["effect"] == pytest.approx(row["effect"], rel=1e-3, abs=1e-6)
    assert direct["kl"] == pytest.approx(row["kl"], rel=1e-3, abs=1e-8)


def test_resid_mid_is_refused_with_the_reason(lm_dir, store, no_boot):
    with pytest.raises(ConfigError, match=r"site='resid_mid' \(a hook there changes only the MLP's input"):
        ps.steer_search(lm_dir, "numpy-torch", site="resid_mid", store=store, device="cpu")


def test_a_bilinear_eigenvector_scores_as_the_same_vector_given_as_a_file(lm_dir, store, tmp_path):
    from app import api
    from analysis.steering.vectors import SteeringVector, save_vector

    rep = api.bilinear_decompose(lm_dir, layer=1, direction="resid:0", store=store, device="cpu")
    key = api.stored_bilinear(store=store)[0].key
    eig = rep.decomposition.eigenvectors[0, 3][:rep.decomposition.d_in]
    path = save_vector(SteeringVector(eig[None].astype(np.float32), (1,)), tmp_path / "eig.safetensors")
    spec_b, spec_f = f"bilinear:{key[:12]}:0:3", f"file:{path}"
    res = ps.steer_search(lm_dir, "numpy-torch", sources=[spec_b, spec_f], layers=[1], budget=20, n_coarse=2,
                          store=store, device="cpu")
    t = res.table.set_index(["source", "alpha"])
    common = t.loc[spec_b].index.intersection(t.loc[spec_f].index)
    assert len(common) >= 2
    a, b = t.loc[spec_b].loc[common], t.loc[spec_f].loc[common]
    np.testing.assert_allclose(a["effect"], b["effect"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a["kl"], b["kl"], rtol=1e-4, atol=1e-8)
    with pytest.raises(ConfigError, match=r"decomposition is of layer 1; include --layers 1"):
        ps.steer_search(lm_dir, "numpy-torch", sources=[spec_b], layers=[0], store=store, device="cpu")


@pytest.mark.slow  # MiniLM: extraction of 48 pairs at 6 layers plus the search, ~1 min on two loaded cores
def test_minilm_search_scores_the_probe_shift_and_embedding_drift(minilm, store):
    from analysis.steering.effect import sentence_embeddings
    from analysis.steering.hooks import steering_hooks

    res = ps.steer_search("minilm", "positive-negative", sources=["mean_diff"], layers=[3], budget=30, n_coarse=3,
                          store=store, device="cpu")
    assert res.meta["kind"] == "encoder" and res.side == "drift"
    t = res.table
    assert (t["drift"] >= 0).all() and t.loc[t["alpha"].abs().idxmax(), "drift"] == t["drift"].max()
    row = t.loc[t["alpha"].idxmax()]
    assert row["effect"] > 0  # toward the positive class along the mean difference
    # independent: one text at a time, plain mean pooling of the last resid_post, sklearn probe refitted
    from sklearn.linear_model import LogisticRegression

    bridge = minilm.boot_bridge()
    from app import api

    ext = api.steer_extract("minilm", "positive-negative", store=store, device="cpu")
    vec = ext.vector(3, "mean_diff")
    v = (res.meta["mean_norms"]["3"] * vec / np.linalg.norm(vec)).astype(np.float32)
    cs = load_contrasts("positive-negative")

    def embed(texts, hooks):
        out = []
        for text in texts:
            with bridge.hooks(fwd_hooks=hooks, reset_hooks_end=True):
                out.append(sentence_embeddings(bridge, [text], max_tokens=64)[0].double())
        return torch.stack(out)

    tr_pos, tr_neg = cs.texts("train")
    x = embed(tr_pos + tr_neg, []).numpy()
    probe = LogisticRegression(C=1.0, tol=1e-8, max_iter=10_000).fit(x, np.r_[np.ones(len(tr_pos)),
                                                                               np.zeros(len(tr_neg))])
    hooks = steering_hooks(bridge, v, alpha=float(row["alpha"]), layers=[3], hook="resid_post")
    held = cs.texts("test")[1]
    shift = probe.predict_proba(embed(held, hooks).numpy())[:, 1].mean() - \
        probe.predict_proba(embed(held, []).numpy())[:, 1].mean()
    neutral = list(ps.neutral_texts(ps.NEUTRAL, 32))
    e0, e1 = embed(neutral, []), embed(neutral, hooks)
    drift = float((1 - torch.nn.functional.cosine_similarity(e0, e1, dim=-1)).mean())
    assert shift == pytest.approx(row["effect"], abs=2e-3)
    assert drift == pytest.approx(row["drift"], rel=1e-3, abs=1e-6)


def test_choose_prefers_a_gain_when_nothing_is_within_the_limit():
    t = pd.DataFrame({"effect": [-0.5, 0.2, 0.9, -0.1], "kl": [0.3, 0.5, 0.4, 0.05]})
    assert so.choose(t, "kl", 0.35) == 3  # within the limit (rows 0, 3): the largest effect there
    assert so.choose(t, "kl", 0.01) == 2  # none within: the gentlest setting that gains (not row 3, a loss)
    assert so.choose(t.assign(effect=-t["effect"].abs()), "kl", 0.01) == 3  # no gain at all: the gentlest


@pytest.mark.slow  # trains MiniLM's masked-LM head on first use (~5 min on 2 cores; cached afterwards)
def test_minilm_masked_loss_delta_matches_the_loss_through_the_steering_hooks(minilm, store):
    """``masked=True``: each setting's masked_loss_delta is the masked-token loss (nats per masked token) of the
    neutral texts with the vector added at the layer, minus without it; 0 for the unsteered model."""
    from analysis.models.masked_lm import mask_tokens, masked_token_loss
    from analysis.steering.hooks import steering_hooks
    from analysis.steering.pipeline_vectors import bridge_for
    from app import api

    res = ps.steer_search("minilm", "positive-negative", sources=["mean_diff"], layers=[3], budget=30, n_coarse=3,
                          masked=True, store=store, device="cpu")
    t = res.table
    assert "masked_loss_delta" in t and t["masked_loss_delta"].notna().all()
    row = t.loc[t["alpha"].abs().idxmax()]
    _, bridge = bridge_for("minilm", mlm_head=True, device="cpu")
    ext = api.steer_extract("minilm", "positive-negative", store=store, device="cpu")
    vec = ext.vector(3, "mean_diff")
    v = (res.meta["mean_norms"]["3"] * vec / np.linalg.norm(vec)).astype(np.float32)
    batch = mask_tokens(bridge.tokenizer, list(ps.neutral_texts(ps.NEUTRAL, 32)), seed=0)
    with model_cache.LOCK:
        base = masked_token_loss(bridge, batch)
        steered = masked_token_loss(bridge, batch, fwd_hooks=steering_hooks(bridge, v, alpha=float(row["alpha"]),
                                                                            layers=[3], hook="resid_post"))
    assert steered - base == pytest.approx(row["masked_loss_delta"], rel=1e-4, abs=1e-6)
    assert abs(row["masked_loss_delta"]) > 1e-3  # the strongest setting moves the loss
