"""MMoE layers (probes/mmoe.py), entmax-1.5 (probes/entmax.py) and the probes (probes/training.py).

Independent truths: a bisection solver for entmax's threshold, expert tensors rebuilt with
numpy loops from the factors, a numpy sum over experts for the dense forward, parameter
counts written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.errors import ConfigError, ShapeError
from probes.entmax import entmax15
from probes.mmoe import (CPMMoE, DenseMMoE, TRMMoE, build_mmoe, cp_params, linear_params, max_experts,
                         mmoe_for_budget, mmoe_params, rank_for_budget, tr_params)


# ----------------------------------------------------------------------------------- entmax-1.5
def entmax15_bisection(z: np.ndarray, iters: int = 200) -> np.ndarray:
    """p_i = max(z_i/2 - tau, 0)^2 with tau found by bisection so that sum p = 1 (float64)."""
    x = z / 2.0
    lo, hi = x.max() - 1.0, x.max()  # sum at lo >= 1 (the max alone contributes 1), at hi = 0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (np.maximum(x - mid, 0) ** 2).sum() >= 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(x - (lo + hi) / 2, 0) ** 2


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 30.0])
@pytest.mark.parametrize("d", [1, 2, 7, 64, 512])
def test_entmax_matches_bisection(d, scale, rng):
    z = rng.standard_normal((20, d)) * scale
    got = entmax15(torch.from_numpy(z)).numpy()
    want = np.stack([entmax15_bisection(row) for row in z])
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-12)
    assert (got >= 0).all()


def test_entmax_is_sparse_and_shift_invariant(rng):
    z = torch.from_numpy(rng.standard_normal((50, 128)) * 3)
    p = entmax15(z)
    assert ((p == 0).sum(1) > 0).all()  # exact zeros off the support
    np.testing.assert_allclose(entmax15(z + 7.5).numpy(), p.numpy(), atol=1e-12)
    # softmax is never sparse: entmax's support is much smaller
    assert (p > 0).sum(1).float().mean() < 0.5 * 128


def test_entmax_limits():
    np.testing.assert_allclose(entmax15(torch.zeros(3, 5, dtype=torch.float64)).numpy(), 0.2)
    np.testing.assert_array_equal(entmax15(torch.tensor([[10.0, 0.0, -3.0]])).numpy(), [[1.0, 0.0, 0.0]])
    # two entries, x = z/2 differing by delta < sqrt(2): p1 = ((delta + sqrt(2 - delta^2)) / 2)^2
    delta = 0.6
    p = entmax15(torch.tensor([2 * delta, 0.0], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(p[0], ((delta + np.sqrt(2 - delta**2)) / 2) ** 2, rtol=1e-12)


def test_entmax_dim_argument(rng):
    z = torch.from_numpy(rng.standard_normal((4, 6, 5)))
    np.testing.assert_allclose(entmax15(z, dim=1).numpy(), entmax15(z.transpose(1, 2), dim=-1).transpose(1, 2).numpy(),
                               atol=1e-12)


def test_entmax_gradient_matches_finite_differences(rng):
    z = torch.from_numpy(rng.standard_normal((3, 9)) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: entmax15(t), (z,), eps=1e-6, atol=1e-6)


def test_entmax_empty_axis_is_a_shape_error():
    with pytest.raises(ShapeError, match="non-empty axis"):
        entmax15(torch.zeros(3, 0))


# --------------------------------------------------------------------------- factorised vs dense
def _random_gates(layer, rng):
    with torch.no_grad():
        for g in layer.gates:
            g.weight.copy_(torch.from_numpy(rng.standard_normal(tuple(g.weight.shape))))


def _numpy_expert_tensor(layer) -> np.ndarray:
    """W rebuilt from the factors with explicit loops (independent of expert_weights())."""
    if layer.kind == "cp":
        facs = [f.detach().numpy() for f in layer.expert_factors]
        u_i, u_o = layer.in_factor.detach().numpy(), layer.out_factor.detach().numpy()
        shape = (*layer.levels, u_i.shape[0], u_o.shape[0])
        w = np.zeros(shape)
        for r in range(layer.rank):
            outer = facs[0][:, r]
            for f in facs[1:]:
                outer = np.multiply.outer(outer, f[:, r])
            w += np.multiply.outer(np.multiply.outer(outer, u_i[:, r]), u_o[:, r])
        return w
    cores = [c.detach().numpy() for c in layer.expert_cores]
    c_in, c_out = layer.in_core.detach().numpy(), layer.out_core.detach().numpy()
    w = np.zeros((*layer.levels, c_in.shape[1], c_out.shape[1]))
    for idx in np.ndindex(*w.shape):
        *ns, i, o = idx
        m = np.eye(cores[0].shape[0])
        for core, n in zip(cores, ns):
            m = m @ core[:, n, :]
        w[idx] = np.trace(m @ c_in[:, i, :] @ c_out[:, o, :])
    return w


LAYER_CASES = [
    ("cp", 6, 3), ("cp", (3, 4), 3), ("tr", 6, (2, 3, 4)), ("tr", (3, 2), (2, 3, 2, 4)),
]


@pytest.mark.parametrize("gate", ["entmax15", "softmax"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind,levels,rank", LAYER_CASES, ids=["cp", "cp-hier", "tr", "tr-hier"])
def test_factorised_forward_equals_dense(kind, levels, rank, bias, gate, rng):
    torch.manual_seed(0)
    cls = CPMMoE if kind == "cp" else TRMMoE
    layer = cls(7, 5, levels, rank, bias=bias, gate=gate).double()
    _random_gates(layer, rng)
    w = _numpy_expert_tensor(layer)
    np.testing.assert_allclose(layer.expert_weights().detach().numpy(), w, rtol=1e-10, atol=1e-12)
    dense = DenseMMoE.from_factorised(layer)
    x = torch.from_numpy(rng.standard_normal((11, 7)))
    y = layer(x)
    np.testing.assert_allclose(y.detach().numpy(), dense(x).detach().numpy(), atol=1e-5)
    # the dense reference itself against a numpy sum over experts
    a = [g.detach().numpy() for g in layer.gate_coefficients(x)]
    coef = a[0] if len(a) == 1 else np.einsum("bn,bm->bnm", a[0], a[1])
    xa = np.concatenate([x.numpy(), np.ones((11, 1))], 1) if bias else x.numpy()
    n_total = int(np.prod(layer.levels))
    want = np.einsum("bn,nio,bi->bo", coef.reshape(11, n_total), w.reshape(n_total, *w.shape[-2:]), xa)
    np.testing.assert_allclose(y.detach().numpy(), want, atol=1e-10)


@pytest.mark.parametrize("kind,levels,rank", LAYER_CASES[:3], ids=["cp", "cp-hier", "tr"])
def test_float32_forward_equals_dense_to_1e5(kind, levels, rank, rng):
    torch.manual_seed(1)
    layer = (CPMMoE if kind == "cp" else TRMMoE)(32, 16, levels, rank)
    _random_gates(layer, rng)
    layer = layer.float()
    x = torch.from_numpy(rng.standard_normal((64, 32)).astype(np.float32))
    np.testing.assert_allclose(layer(x).detach().numpy(), DenseMMoE.from_factorised(layer)(x).detach().numpy(),
                               atol=1e-5)


def test_token_shaped_input_is_flattened_and_restored(rng):
    layer = CPMMoE(8, 3, 5, 4).double().eval()
    x = torch.from_numpy(rng.standard_normal((2, 6, 8)))
    np.testing.assert_allclose(layer(x).detach().numpy(), layer(x.reshape(12, 8)).reshape(2, 6, 3).detach().numpy())


def test_gates_start_uniform():
    layer = CPMMoE(10, 4, 16, 3)
    (a,) = layer.gate_coefficients(torch.randn(8, 10))
    np.testing.assert_allclose(a.detach().numpy(), 1 / 16, rtol=1e-6)  # G = 0: every score equal


@pytest.mark.parametrize("kind,rank", [("cp", 4), ("tr", (3, 2, 5))])
def test_ablation_removes_exactly_one_expert_term(kind, rank, rng):
    torch.manual_seed(2)
    layer = (CPMMoE if kind == "cp" else TRMMoE)(9, 4, 6, rank).double()
    _random_gates(layer, rng)
    x = torch.from_numpy(rng.standard_normal((13, 9)))
    (a,) = layer.gate_coefficients(x)
    w = _numpy_expert_tensor(layer)
    xa = np.concatenate([x.numpy(), np.ones((13, 1))], 1)
    full = layer(x, a=a).detach().numpy()
    for k in (0, 3):
        mask = torch.ones(6, dtype=torch.float64)
        mask[k] = 0
        ablated = layer(x, a=a * mask).detach().numpy()
        term = a[:, k].detach().numpy()[:, None] * (xa @ w[k])  # a_k W_k^T x'
        np.testing.assert_allclose(ablated, full - term, atol=1e-10)


def test_bad_gate_shapes_are_shape_errors(rng):
    layer = CPMMoE(4, 2, 3, 2)
    x = torch.randn(5, 4)
    with pytest.raises(ShapeError, match=r"\(batch=5, n_experts=3\)"):
        layer(x, a=torch.ones(5, 4))
    with pytest.raises(ShapeError, match="d_in=4"):
        layer(torch.randn(5, 6))


# ----------------------------------------------------------------------- parameter counts, budgets
def test_parameter_counts_by_hand():
    # CP: R (N + I + 1 + O) + I N
    assert cp_params(10, 7, 5, 3) == 3 * (5 + 11 + 7) + 10 * 5 == 119
    assert CPMMoE(10, 7, 5, 3).n_params == 119
    assert cp_params(10, 7, 5, 3, bias=False) == 3 * (5 + 10 + 7) + 50 == CPMMoE(10, 7, 5, 3, bias=False).n_params
    # hierarchical CP: R (N1 + N2 + I + 1 + O) + I (N1 + N2)
    assert cp_params(10, 7, (4, 3), 2) == 2 * (4 + 3 + 11 + 7) + 10 * 7 == 120 == CPMMoE(10, 7, (4, 3), 2).n_params
    # TR (r0, r1, r2): r0 N r1 + r1 (I+1) r2 + r2 O r0 + I N
    assert tr_params(10, 7, 5, (2, 3, 4)) == 2 * 5 * 3 + 3 * 11 * 4 + 4 * 7 * 2 + 50 == 268
    assert TRMMoE(10, 7, 5, (2, 3, 4)).n_params == 268
    assert TRMMoE(10, 7, (5, 2), (2, 3, 1, 4)).n_params == 2 * 5 * 3 + 3 * 2 * 1 + 1 * 11 * 4 + 4 * 7 * 2 + 70
    assert linear_params(10, 7) == 77 == sum(p.numel() for p in torch.nn.Linear(10, 7).parameters())


@pytest.mark.parametrize("d_in,d_out,n", [(384, 512, 8), (384, 512, 256), (64, 512, 100), (768, 1000, 64)])
def test_cp_rank_for_budget_is_the_largest_that_fits(d_in, d_out, n):
    budget = linear_params(d_in, d_out)
    r = rank_for_budget("cp", d_in, d_out, n, budget)
    assert r == (budget - d_in * n) // (n + d_in + 1 + d_out)  # the formula solved by hand
    assert cp_params(d_in, d_out, n, r) <= budget < cp_params(d_in, d_out, n, r + 1)
    assert mmoe_for_budget("cp", d_in, d_out, n).n_params == cp_params(d_in, d_out, n, r)


@pytest.mark.parametrize("n", [8, 64, 256])
def test_tr_rank_for_budget(n):
    d_in, d_out, budget = 384, 512, linear_params(384, 512)
    r = rank_for_budget("tr", d_in, d_out, n, budget)
    # r0 = r1 = 4 fixed: budget >= 4 N 4 + 4 (I+1) r + r O 4 + I N
    assert r == (budget - 16 * n - d_in * n) // (4 * (d_in + 1) + 4 * d_out)
    layer = build_mmoe("tr", d_in, d_out, n, r)
    assert layer.ranks == (4, 4, r) and layer.n_params <= budget < mmoe_params("tr", d_in, d_out, n, r + 1)


def test_too_many_experts_names_the_maximum():
    budget = linear_params(64, 10)  # 650
    top = max_experts("cp", 64, 10, budget)
    assert cp_params(64, 10, top, 1) <= budget < cp_params(64, 10, top + 1, 1)
    assert top == (650 - 65 - 10) // 65 == 8
    with pytest.raises(ConfigError, match=r"9 experts do not fit a budget of 650 .* at most N = 8 experts"):
        rank_for_budget("cp", 64, 10, 9, budget)
    rank_for_budget("cp", 64, 10, 8, budget)  # the maximum itself fits
    with pytest.raises(ConfigError, match="at most N = 0 experts"):
        rank_for_budget("tr", 64, 10, 1, 100)


@pytest.mark.parametrize("make", [lambda: CPMMoE(4, 2, 3, 0), lambda: CPMMoE(4, 2, 3, -2),
                                  lambda: TRMMoE(4, 2, 3, (2, 0, 2)), lambda: build_mmoe("tr", 4, 2, 3, 0)],
                         ids=["cp0", "cp-neg", "tr0", "build-tr0"])
def test_rank_must_be_positive(make):
    with pytest.raises(ConfigError, match="must be >= 1"):
        make()


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown gate 'relu'"):
        CPMMoE(4, 2, 3, 2, gate="relu")
    with pytest.raises(ConfigError, match="unknown MMoE kind 'tucker'"):
        build_mmoe("tucker", 4, 2, 3, 2)
    with pytest.raises(ConfigError, match="needs 3 ranks"):
        TRMMoE(4, 2, 3, (2, 2))
    with pytest.raises(ConfigError, match="one expert count"):
        CPMMoE(4, 2, (2, 2, 2), 2)
    with pytest.raises(ConfigError, match="budget=0"):
        rank_for_budget("cp", 4, 2, 3, 0)


# ------------------------------------------------------------------------------------- probes
@pytest.fixture(scope="module")
def digits():
    from probes.training import digits_features

    return digits_features()


def test_probe_fit_returns_self_and_sets_learned_state(digits):
    from probes.training import ProbeClassifier

    Xtr, ytr = digits.train
    probe = ProbeClassifier(layer="cp", n_experts=16, hidden=64, epochs=8)
    assert probe.fit(Xtr, ytr) is probe
    learned = {k for k in vars(probe) if k.endswith("_")}
    assert {"net_", "mean_", "scale_", "rank_", "budget_", "n_params_", "layer_params_", "losses_"} <= learned
    assert probe.layer_params_ <= probe.budget_ == linear_params(64, 64)
    assert probe.losses_[-1] < probe.losses_[0]
    assert probe.score(*digits.test) > 0.85
    g = probe.gates(digits.test[0])
    np.testing.assert_allclose(g.sum(1), 1.0, atol=1e-5)


def test_probe_state_round_trip_and_gate_scale(digits):
    from probes.training import ProbeClassifier

    Xtr, ytr = digits.train
    probe = ProbeClassifier(layer="tr", n_experts=8, hidden=None, budget=8000, epochs=3).fit(Xtr, ytr)
    again = ProbeClassifier.from_state(probe.params(), probe.state_arrays(), 10)
    Xte = digits.test[0]
    np.testing.assert_array_equal(again.logits(Xte), probe.logits(Xte))
    # single-layer MMoE head: logits are linear in the gates, so ablating k removes a_k * (its logits)
    full = probe.logits(Xte)
    zero = probe.logits(Xte, np.zeros(8))  # every coefficient 0: nothing is mixed
    np.testing.assert_allclose(zero, 0.0, atol=1e-6)
    s = np.ones(8)
    s[2] = 0.0
    half = np.ones(8)
    half[2] = 0.5
    np.testing.assert_allclose(full - probe.logits(Xte, s), 2 * (full - probe.logits(Xte, half)), atol=1e-4)


def test_probe_bad_input():
    from probes.training import ProbeClassifier

    with pytest.raises(ConfigError, match="needs n_experts >= 1"):
        ProbeClassifier(layer="cp", n_experts=0)
    with pytest.raises(ConfigError, match="unknown probe layer"):
        ProbeClassifier(layer="mlp")
    with pytest.raises(ConfigError, match="not fitted"):
        ProbeClassifier(layer="linear").predict(np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="at most N = "):
        ProbeClassifier(layer="cp", n_experts=64, hidden=None).fit(np.random.rand(20, 64), np.arange(20) % 10)
    with pytest.raises(ConfigError, match="non-negative integers"):
        ProbeClassifier(layer="linear").fit(np.zeros((4, 3)), np.array([0.5, 1, 0, 1]))


def test_benchmark_peak_memory_measure():
    from benchmarks.mmoe import peak_forward_bytes

    a = torch.randn(500, 500)
    assert peak_forward_bytes(lambda: a @ a) == 500 * 500 * 4  # the output only

    def two_temporaries():
        t = a * 2
        u = t + 1  # t and u alive together: 2 buffers
        del t
        return u.sum()

    assert peak_forward_bytes(two_temporaries) >= 2 * 500 * 500 * 4
