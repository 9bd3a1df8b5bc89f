"""Head attribution, direct feature attribution, polysemantic heads, feature dashboard data and
logit-effect weights, checked against float64 numpy / brute-force references on small SAEs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.errors import ConfigError, ShapeError, SourceError
from sae import SAE, SAEConfig
from sae.attribution import direct_feature_attribution, head_attribution, polysemantic_heads, token_sets
from sae.features import feature_data, from_result, logit_effects, to_result

N_HEADS, D_HEAD = 3, 4


def make_sae(d_sae: int = 24, architecture: str = "relu", seed: int = 0, bias: float = 0.3) -> SAE:
    extra = {"k": 5} if architecture == "topk" else {}
    cfg = SAEConfig(d_in=N_HEADS * D_HEAD, d_sae=d_sae, architecture=architecture, n_heads=N_HEADS, d_head=D_HEAD,
                    layer=1, hook_name="blocks.1.attn.hook_z", seed=seed, **extra)
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases and an encoder that is not the decoder's transpose
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc.copy_(-bias * torch.rand(d_sae, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(cfg.d_in, generator=g))
    return sae


# -------------------------------------------------------------------------- head attribution
def test_head_attribution_is_normalised_slice_norms():
    sae = make_sae()
    w = head_attribution(sae)
    dec = sae.W_dec.detach().double().numpy().reshape(-1, N_HEADS, D_HEAD)
    norms = np.sqrt((dec**2).sum(axis=2))
    np.testing.assert_allclose(w, norms / norms.sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-12)
    assert w.shape == (24, N_HEADS) and (w >= 0).all()


@pytest.mark.parametrize("head", range(N_HEADS))
def test_feature_living_in_one_head_attributes_everything_to_it(head, rng):
    sae = make_sae()
    row = np.zeros(N_HEADS * D_HEAD)
    row[head * D_HEAD:(head + 1) * D_HEAD] = rng.standard_normal(D_HEAD)
    with torch.no_grad():
        sae.W_dec[5] = torch.from_numpy(row / np.linalg.norm(row))
        sae.W_dec[6] = 0.0
    w = head_attribution(sae)
    np.testing.assert_array_equal(w[5], np.eye(N_HEADS)[head])
    np.testing.assert_array_equal(w[6], 0.0)  # an all-zero decoder row attributes to no head


def test_head_attribution_needs_head_metadata():
    sae = SAE(SAEConfig(d_in=12, d_sae=8))
    with pytest.raises(ConfigError, match="does not record n_heads/d_head"):
        head_attribution(sae)


# -------------------------------------------------------------------------- DFA
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_dfa_sums_to_the_pre_activation_without_bias_terms(architecture, rng):
    sae = make_sae(architecture=architecture)
    z = rng.standard_normal((7, N_HEADS, D_HEAD))
    dfa = direct_feature_attribution(sae, torch.from_numpy(z).float())
    assert dfa.shape == (7, 24, N_HEADS)
    W_enc, b_enc, b_dec = (p.detach().double().numpy() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    x = z.astype(np.float32).astype(np.float64).reshape(7, -1)
    # per head: z_h . W_enc[h slice, i], computed slice by slice
    for h in range(N_HEADS):
        sl = slice(h * D_HEAD, (h + 1) * D_HEAD)
        np.testing.assert_allclose(dfa[:, :, h], x[:, sl] @ W_enc[sl], rtol=1e-10, atol=1e-12)
    # summed over heads: the encoder pre-activation minus its bias terms (the SAE's own float32 forward)
    pre = sae.pre_acts(torch.from_numpy(x).float()).detach().double().numpy()
    np.testing.assert_allclose(dfa.sum(axis=2), pre - b_enc + b_dec @ W_enc, atol=2e-5)
    # a subset of features, and the flattened input, give the same numbers
    np.testing.assert_allclose(direct_feature_attribution(sae, x, features=[3, 0]), dfa[:, [3, 0]], rtol=1e-12)


def test_dfa_bad_input_is_a_typed_error():
    sae = make_sae()
    with pytest.raises(ShapeError, match=r"needs \[pos, 3, 4\] or \[pos, 12\]"):
        direct_feature_attribution(sae, np.zeros((5, 4, 3)))
    with pytest.raises(ConfigError, match="feature index 24 is out of range: this SAE has 24 features"):
        direct_feature_attribution(sae, np.zeros((5, 12)), features=[1, 24])


# -------------------------------------------------------------------------- polysemantic heads
def test_polysemantic_heads_follow_the_documented_rule():
    """Head 0: features {0,1} share tokens, {2,3} share other tokens -> 2 families (polysemantic).
    Head 1: three features sharing a token -> 1 family. Head 2: only feature 7, which is dead.
    Feature 8 is split evenly across heads (1/3 < min_weight = 0.5): it belongs to no head."""
    d_sae, d_in = 9, N_HEADS * D_HEAD
    W_dec = np.zeros((d_sae, d_in))
    for i, (h, j) in enumerate([(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0)]):
        W_dec[i, h * D_HEAD + j] = 1.0  # orthogonal rows: only tokens can relate features
    W_dec[8, [0, 4, 8]] = 1.0
    norms = np.linalg.norm(W_dec.reshape(d_sae, N_HEADS, D_HEAD), axis=2)
    attribution = norms / norms.sum(axis=1, keepdims=True)
    tokens = [frozenset(s) for s in ({1, 2}, {2, 3}, {7, 8}, {8, 9}, {5, 6}, {5}, {5, 11}, {4}, {1, 2})]
    density = np.array([0.1] * 7 + [0.0, 0.1])
    res = polysemantic_heads(attribution, tokens, W_dec, density=density, decode=lambda t: f"t{t}", min_weight=0.5)
    t = res.table.set_index("head")
    assert list(t["n_top"]) == [4, 3, 0] and list(t["n_families"]) == [2, 1, 0]
    assert list(t["polysemantic"]) == [True, False, False]
    assert res.n_polysemantic == 1 and res.n_counted == 2
    assert res.family[0] == res.family[1] != res.family[2] == res.family[3]
    assert res.family[4] == res.family[5] == res.family[6] and res.family[7] == res.family[8] == -1
    assert t.loc[0, "family_sizes"] == "2+2" and "'t1' 't2' 't3'" in t.loc[0, "families"]
    # the default min_weight (0.3) admits feature 8 (1/3 on each head; ties go to the lowest head)
    default = polysemantic_heads(attribution, tokens, W_dec, density=density)
    assert default.settings["min_weight"] == 0.3 and list(default.table["n_top"]) == [5, 3, 0]
    assert default.family[8] == default.family[0]  # same tokens as feature 0
    # decoder cosine relates features too: rotate feature 2 onto feature 0's direction -> one family
    W_dec[2] = W_dec[0]
    res = polysemantic_heads(attribution, tokens, W_dec, density=density, min_weight=0.5)
    assert res.table.loc[0, "n_families"] == 1  # 0~1 (tokens), 0~2 (cosine), 2~3 (tokens)
    with pytest.raises(ConfigError, match="unknown polysemantic-head setting"):
        polysemantic_heads(attribution, tokens, W_dec, jaccard=0.5)


# -------------------------------------------------------------------------- feature data
def corpus(rng, n_docs=30, length=(3, 25), vocab=60):
    """Rows of a fake activation cache in shuffled order: docs of random lengths."""
    docs, poss = [], []
    for d in range(n_docs):
        n = int(rng.integers(*length))
        docs += [d] * n
        poss += list(range(n))
    perm = rng.permutation(len(docs))
    doc, pos = np.array(docs)[perm], np.array(poss)[perm]
    return doc, pos, rng.integers(0, vocab, len(doc))


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_feature_data_matches_brute_force(architecture, rng):
    sae = make_sae(architecture=architecture)
    doc, pos, tok = corpus(rng)
    acts = rng.standard_normal((len(doc), 12)).astype(np.float32)
    before, after = 3, 2
    fd = feature_data(sae, acts, tok, doc, pos, batch_size=50, n_top=4, before=before, after=after,
                      n_intervals=3, n_per_interval=2, n_bins=7, decode=lambda ids: [f"<{i}>" for i in ids])
    F = sae.encode(torch.from_numpy(acts)).detach().numpy()
    np.testing.assert_allclose(fd.density, (F > 0).mean(axis=0), rtol=0, atol=0)
    np.testing.assert_allclose(fd.max_act, F.max(axis=0), rtol=1e-7)
    at = {(int(d), int(p)): r for r, (d, p) in enumerate(zip(doc, pos))}
    for i in range(sae.cfg.d_sae):
        col = F[:, i]
        nz = np.flatnonzero(col > 0)
        if len(nz):
            np.testing.assert_allclose(fd.mean_act[i], col[nz].mean(), rtol=1e-6)
        want = sorted(nz, key=lambda r: (-col[r], r))[:4]  # top contexts are the argmax rows
        assert list(fd.top_rows[i][: len(want)]) == want and (fd.top_rows[i][len(want):] == -1).all()
        np.testing.assert_array_equal(fd.top_acts[i][: len(want)], col[want])
        for k, r in enumerate(want):  # windows: same document, positions p-3 .. p+2
            for o, p in enumerate(range(pos[r] - before, pos[r] + after + 1)):
                rr = at.get((int(doc[r]), p))
                assert fd.top_tokens[i, k, o] == (-1 if rr is None else tok[rr])
                assert fd.top_token_acts[i, k, o] == (0.0 if rr is None else col[rr])
        if len(nz):
            counts, _ = np.histogram(col[nz], bins=fd.hist_edges[i])
            np.testing.assert_array_equal(fd.hist_counts[i], counts)
            srt = np.sort(col[nz])
            bounds = (np.arange(4) * len(nz)) // 3
            np.testing.assert_array_equal(fd.quantile_edges[i], np.r_[srt[np.minimum(bounds[:-1], len(nz) - 1)],
                                                                       srt[-1]])
            for j in range(3):
                picked = fd.quantile_rows[i, j][fd.quantile_rows[i, j] >= 0]
                inside = srt[bounds[j]:bounds[j + 1]]
                assert len(picked) == min(2, len(inside)) and len(set(picked)) == len(picked)
                assert np.isin(col[picked], inside).all()
                np.testing.assert_array_equal(fd.quantile_acts[i, j][: len(picked)], col[picked])
    # contexts as texts: the activating token is at ``centre``
    ctx = fd.contexts(int(np.argmax(fd.density)))[0]
    assert ctx.acts[ctx.centre] == ctx.activation and ctx.tokens[ctx.centre].startswith("<")
    with pytest.raises(ConfigError, match="feature index 99 is out of range"):
        fd.contexts(99)


def test_logit_effects_match_a_direct_matrix_product(rng):
    sae = make_sae(d_sae=40)
    W_O = torch.from_numpy(rng.standard_normal((N_HEADS, D_HEAD, 6))).float()
    W_U = torch.from_numpy(rng.standard_normal((6, 50))).float()
    pos_ids, pos_v, neg_ids, neg_v = logit_effects(sae.W_dec.detach(), W_O, W_U, 5, batch=7)
    dec = sae.W_dec.detach().double().numpy()
    # decoder row per head slice -> that head's W_O -> residual direction -> W_U
    resid = sum(dec[:, h * D_HEAD:(h + 1) * D_HEAD] @ W_O[h].double().numpy() for h in range(N_HEADS))
    full = resid @ W_U.double().numpy()
    np.testing.assert_array_equal(pos_ids, np.argsort(-full, axis=1)[:, :5])
    np.testing.assert_array_equal(neg_ids, np.argsort(full, axis=1)[:, :5])
    np.testing.assert_allclose(pos_v, np.take_along_axis(full, pos_ids.astype(int), 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(neg_v, np.take_along_axis(full, neg_ids.astype(int), 1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ShapeError, match="do not chain"):
        logit_effects(sae.W_dec.detach(), W_O, W_U.T, 5)


def test_feature_data_round_trips_through_the_store(rng, store):
    sae = make_sae()
    doc, pos, tok = corpus(rng)
    acts = rng.standard_normal((len(doc), 12)).astype(np.float32)
    W_O, W_U = torch.randn(N_HEADS, D_HEAD, 6), torch.randn(6, 60)
    fd = feature_data(sae, acts, tok, doc, pos, W_O=W_O, W_U=W_U, decode=lambda ids: [f"<{i}>" for i in ids])
    store.put("f" * 32, "sae-features", {"x": 1}, "v", to_result(fd))
    back = from_result(store.get("f" * 32, "sae-features", {"x": 1}, "v"))
    for name in ("density", "top_rows", "top_token_acts", "quantile_tokens", "logit_pos_ids", "head_attribution"):
        np.testing.assert_array_equal(getattr(back, name), getattr(fd, name))
    assert back.token_strings == fd.token_strings and back.meta["settings"] == fd.meta["settings"]
    assert list(back.table["boosted"]) == list(fd.table["boosted"])
    lt = back.logit_table(2)
    assert list(lt["boosted"]) == [f"<{t}>" for t in fd.logit_pos_ids[2]]
    tokens = token_sets(back.top_tokens[:, :, back.centre])
    assert all(t <= set(tok) for t in tokens)


def test_feature_data_bad_input(rng):
    sae = make_sae()
    doc, pos, tok = corpus(rng)
    acts = rng.standard_normal((len(doc), 12)).astype(np.float32)
    with pytest.raises(ShapeError, match="do not fit this SAE"):
        feature_data(sae, acts[:, :8], tok, doc, pos)
    with pytest.raises(ShapeError, match="token_ids has shape"):
        feature_data(sae, acts, tok[:-1], doc, pos)
    with pytest.raises(ConfigError, match="exceed max_nonzeros=10"):
        feature_data(sae, acts, tok, doc, pos, max_nonzeros=10)
    with pytest.raises(ConfigError, match="unknown feature-data setting"):
        feature_data(sae, acts, tok, doc, pos, top=3)


# -------------------------------------------------------------------------- readout weights
def test_readout_weights_match_the_bridge_and_the_hf_head(tmp_path):
    from transformers import AutoModelForCausalLM

    from _tiny_mixtral import make_tiny_mixtral
    from analysis.sources import open_source
    from sae.readout import attention_output, unembedding

    src = open_source(make_tiny_mixtral(tmp_path / "mixtral"))
    bridge = src.boot_bridge()
    for layer in range(2):
        torch.testing.assert_close(attention_output(src, layer, 4), bridge.blocks[layer].attn.W_O.detach())
    W_U, note = unembedding(src)
    assert "lm_head" in note and "model.norm.weight" in note
    # the final RMSNorm's scale is folded in: d @ W_U = lm_head(norm(d)) * rms(d) for any residual direction d
    hf = AutoModelForCausalLM.from_pretrained(src.hf_dir)
    d = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    eps = hf.config.rms_norm_eps
    with torch.no_grad():
        want = hf.lm_head(hf.model.norm(d)) * (d.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    torch.testing.assert_close(d @ W_U, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(SourceError, match="no attention output projection for layer 7"):
        attention_output(src, 7, 4)


def test_minilm_readout_uses_the_tied_word_embeddings(minilm):
    from sae.readout import attention_output, unembedding

    bridge = minilm.boot_bridge()
    torch.testing.assert_close(attention_output(minilm, 3, 12), bridge.blocks[3].attn.W_O.detach())
    W_U, note = unembedding(minilm)
    assert "tied word embeddings" in note
    torch.testing.assert_close(W_U, minilm.tensor("embeddings.word_embeddings.weight").T)
