"""Routed-MoE statistics (analysis/experts/routing.py): a routing log built by hand, and the collector
on a small random Mixtral checked against the Hugging Face router logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.experts import routing
from analysis.errors import ShapeError, SourceError

# one layer, E = 4 experts, k = 2, six tokens: ids 5, 5, 5, 7, 7, 7; domains a, a, a, b, b, b
INDICES = np.array([[[0, 1], [0, 1], [0, 2], [1, 3], [0, 1], [2, 3]]])
PROBS = np.tile([0.4, 0.3, 0.2, 0.1], (1, 6, 1))


def hand_log() -> routing.RoutingLog:
    return routing.RoutingLog(np.array([5, 5, 5, 7, 7, 7]), np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 0, 1, 1, 1]),
                              INDICES, PROBS, ("a", "b"), {5: "foo", 7: "bar"})


def test_routing_statistics_by_hand():
    st = routing.routing_stats(hand_log(), min_count=3, seed=0)
    row = st.layers.iloc[0]
    np.testing.assert_allclose(st.usage[0], np.array([4, 4, 2, 2]) / 12)
    # load balance E * sum f_i P_i = 4 (4/12 .4 + 4/12 .3 + 2/12 .2 + 2/12 .1)
    assert row["load_balance"] == pytest.approx(4 * (1.6 + 1.2 + 0.4 + 0.2) / 12)
    assert row["routing_entropy"] == pytest.approx(-sum(p * math.log2(p) for p in (0.4, 0.3, 0.2, 0.1)))
    assert row["usage_entropy"] == pytest.approx(-sum(p * math.log2(p) for p in (1 / 3, 1 / 3, 1 / 6, 1 / 6)))
    np.testing.assert_allclose(st.coactivation[0], [[1, 3 / 4, 1 / 4, 0], [3 / 4, 1, 0, 1 / 4],
                                                    [1 / 2, 0, 1, 1 / 2], [0, 1 / 2, 1 / 2, 1]])
    # token 5: expert 0 takes 3 of 3 occurrences; token 7: experts 1 and 3 take 2 of 3 each
    assert row["token_specialisation"] == pytest.approx((1 + 2 / 3) / 2)
    assert row["baseline_k_over_e"] == 0.5
    assert row["n_tokens_counted"] == 2
    tokens = st.tokens.set_index("token")
    assert tokens.loc["foo", "top_expert"] == 0 and tokens.loc["foo", "share"] == 1.0
    np.testing.assert_allclose(st.domain_usage[0], [[3 / 6, 2 / 6, 1 / 6, 0], [1 / 6, 2 / 6, 1 / 6, 2 / 6]])
    from sklearn.metrics import mutual_info_score

    mi = mutual_info_score(None, None, contingency=np.array([[3, 2, 1, 0], [1, 2, 1, 2]])) / math.log(2)
    assert row["domain_mi"] == pytest.approx(mi)


def test_uniform_routing_balances_to_one():
    T, E, k = 400, 8, 2
    idx = np.stack([np.arange(T) % E, (np.arange(T) + 1) % E], 1)[None]  # every expert 100 times
    log = routing.RoutingLog(np.arange(T) % 50, np.zeros(T, dtype=int), np.zeros(T, dtype=int), idx,
                             np.full((1, T, E), 1 / E), ("all",), {})
    row = routing.routing_stats(log, min_count=5).layers.iloc[0]
    assert row["load_balance"] == pytest.approx(1.0)
    assert row["routing_entropy"] == pytest.approx(3.0)
    assert row["usage_entropy"] == pytest.approx(3.0)
    assert row["domain_mi"] == pytest.approx(0.0)


def test_shuffled_baseline_keeps_loads():
    rng = np.random.default_rng(0)
    T, E = 600, 4
    ids = rng.integers(0, 20, T)
    idx = np.stack([ids % E, (ids + 1) % E], 1)[None]  # routing fully determined by the token
    log = routing.RoutingLog(ids, np.zeros(T, dtype=int), np.zeros(T, dtype=int), idx, np.full((1, T, E), 0.25),
                             ("all",), {})
    row = routing.routing_stats(log, min_count=5).layers.iloc[0]
    assert row["token_specialisation"] == 1.0
    assert row["shuffled_specialisation"] < 0.85  # shuffling across tokens destroys it


def test_log_shape_errors():
    with pytest.raises(ShapeError, match="disagree"):
        routing.RoutingLog(np.arange(5), np.zeros(6, dtype=int), np.zeros(6, dtype=int), INDICES, PROBS, ("a",), {})
    with pytest.raises(ShapeError, match=r"lie in \[0, 4\)"):
        routing.RoutingLog(np.arange(6), np.zeros(6, dtype=int), np.zeros(6, dtype=int), INDICES + 3, PROBS,
                           ("a",), {})


def test_model_without_routers_is_a_source_error(minilm):
    with pytest.raises(SourceError, match="no expert routers found .*bert.*tiny-mixtral"):
        routing.require_routers(minilm)


# ------------------------------------------------------------------------- a real (random) Mixtral
@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    from _tiny_mixtral import make_tiny_mixtral

    return make_tiny_mixtral(tmp_path_factory.mktemp("mixtral"))


def test_collect_routing_matches_hf_router_logits(tiny_mixtral):
    from transformers import AutoTokenizer, MixtralForCausalLM

    from analysis.sources import open_source

    texts = ["numpy arrays", "pandas frames and torch", "json dumps numpy"]
    log = routing.collect_routing(open_source(str(tiny_mixtral)), texts, ["np", "pd", "np"])
    assert log.backend == "bridge"
    tok = AutoTokenizer.from_pretrained(tiny_mixtral)
    model = MixtralForCausalLM.from_pretrained(tiny_mixtral).eval()
    ids = [tok(t, return_tensors="pt")["input_ids"] for t in texts]
    with torch.no_grad():
        outs = [model(i, output_router_logits=True).router_logits for i in ids]
    for layer in range(2):
        logits = torch.cat([o[layer] for o in outs])
        np.testing.assert_allclose(log.probs[layer], torch.softmax(logits, -1).numpy(), atol=1e-5)
        want = torch.topk(logits, 2, dim=-1).indices.numpy()
        np.testing.assert_array_equal(np.sort(log.indices[layer], 1), np.sort(want, 1))
    assert list(log.domain) == [0] * ids[0].shape[1] + [1] * ids[1].shape[1] + [0] * ids[2].shape[1]
    st = routing.routing_stats(log, min_count=2)
    assert len(st.layers) == 2 and st.coactivation.shape == (2, 4, 4)
    np.testing.assert_allclose(st.usage.sum(1), 1.0)
