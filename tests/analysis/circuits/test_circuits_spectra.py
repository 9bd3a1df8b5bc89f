"""The circuit maths (analysis.circuits.spectra, analysis.circuits.weights) against dense float64 products:
numpy's SVD of W_Q @ W_K.T (d_model x d_model) is the reference for the factored singular values, and numpy on
its top d_head values the reference for kappa, stable rank and effective rank."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from analysis.circuits import spectra
from analysis.circuits.weights import kv_groups, layer_weights
from analysis.errors import ShapeError

RTOL = 1e-10
SHAPES = [(16, 4), (64, 8), (96, 32), (384, 32), (512, 64), (8, 16)]  # (d_model, d_head); the last: d_head > d_model


def dense_reference(a: np.ndarray, b: np.ndarray, k: int, rank: int) -> dict[str, float | np.ndarray]:
    """numpy on the dense float64 product: its top k singular values and the metrics of its top ``rank``."""
    s = np.linalg.svd(a.astype(np.float64) @ b.astype(np.float64), compute_uv=False)[:k]
    top = s[:rank]
    p = top / top.sum()
    return {"s": s, "kappa": s[0] / s[k - 1] if rank == k else math.inf, "stable_rank": (s**2).sum() / s[0] ** 2,
            "effective_rank": float(np.exp(-(p * np.log(p)).sum()))}


def metrics_of(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    s = spectra.factored_singular_values(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    return s, spectra.spectrum_metrics(s[None], d_model=a.shape[0])


@pytest.mark.parametrize("d_model,d_head", SHAPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_factored_singular_values_and_metrics_match_the_dense_product(d_model, d_head, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((d_model, d_head)), rng.standard_normal((d_head, d_model)) * 0.1
    k = min(d_model, d_head)
    s, m = metrics_of(a, b)
    ref = dense_reference(a, b, k, k)
    assert s.dtype == np.float64 and s.shape == (k,) and np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, ref["s"], rtol=RTOL, atol=0)
    for name in ("kappa", "stable_rank", "effective_rank"):
        np.testing.assert_allclose(m[name][0], ref[name], rtol=RTOL, err_msg=name)
    assert m["s_max"][0] == s[0] and m["s_min"][0] == s[-1]


@pytest.mark.parametrize("d_model,d_head,rank", [(64, 8, 5), (384, 32, 20), (768, 64, 1)], ids=str)
def test_rank_deficient_factors_give_kappa_inf_and_exact_nonzero_values(d_model, d_head, rank, rng):
    a = rng.standard_normal((d_model, rank)) @ rng.standard_normal((rank, d_head))  # rank < d_head
    b = rng.standard_normal((d_head, d_model))
    s, m = metrics_of(a, b)
    ref = dense_reference(a, b, d_head, rank)
    np.testing.assert_allclose(s[:rank], ref["s"][:rank], rtol=RTOL, atol=0)
    assert s[rank:].max() <= s[0] * d_model * spectra.EPS64  # zero to float64 precision
    assert m["kappa"][0] == math.inf
    np.testing.assert_allclose(m["stable_rank"][0], ref["stable_rank"], rtol=RTOL)
    np.testing.assert_allclose(m["effective_rank"][0], ref["effective_rank"], rtol=RTOL)
    full = spectra.spectrum_metrics(ref["s"][None], d_model=d_model)  # the dense values give the same verdict
    assert full["kappa"][0] == math.inf


def test_a_zero_circuit_has_infinite_kappa_and_zero_ranks_without_warnings():
    s = spectra.factored_singular_values(torch.zeros(32, 4, dtype=torch.float64), torch.ones(4, 32)).numpy()
    with np.errstate(all="raise"):
        m = spectra.spectrum_metrics(s[None], d_model=32)
    assert (s == 0).all() and m["kappa"][0] == math.inf and m["stable_rank"][0] == 0 and m["effective_rank"][0] == 0


def test_metric_conventions_on_known_spectra():
    s = np.array([[4.0, 2.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    m = spectra.spectrum_metrics(s, d_model=16)
    np.testing.assert_allclose(m["kappa"], [4.0, 1.0])
    np.testing.assert_allclose(m["stable_rank"], [(16 + 4 + 1 + 1) / 16, 4.0])
    p = s[0] / s[0].sum()
    np.testing.assert_allclose(m["effective_rank"], [np.exp(-(p * np.log(p)).sum()), 4.0])


def test_the_same_values_as_transformer_lens_factored_matrix(rng):
    from transformer_lens import FactoredMatrix

    a = torch.from_numpy(rng.standard_normal((3, 5, 48, 8)))  # (n_layers, n_heads, d_model, d_head)
    b = torch.from_numpy(rng.standard_normal((3, 5, 8, 48)))
    ours = spectra.factored_singular_values(a, b)
    assert ours.shape == (3, 5, 8)
    torch.testing.assert_close(ours, FactoredMatrix(a, b).S.to(torch.float64), rtol=RTOL, atol=0)


def test_query_heads_of_one_group_share_their_key_and_value_factor(rng):
    n_heads, n_kv, d_model, d_head = 6, 2, 40, 8
    w_q, w_k, w_v = (torch.from_numpy(rng.standard_normal(s)) for s in
                     [(n_heads, d_model, d_head), (n_kv, d_model, d_head), (n_kv, d_model, d_head)])
    w_o = torch.from_numpy(rng.standard_normal((n_heads, d_head, d_model)))
    kv = kv_groups(n_heads, n_kv)
    assert kv.tolist() == [0, 0, 0, 1, 1, 1]  # repeat_interleave: HF's repeat_kv and TransformerLens's layout
    got = spectra.circuit_singular_values(w_q, w_k, w_v, w_o, kv)
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        qk = np.linalg.svd(w_q[h].numpy() @ w_k[g].numpy().T, compute_uv=False)[:d_head]
        ov = np.linalg.svd(w_v[g].numpy() @ w_o[h].numpy(), compute_uv=False)[:d_head]
        np.testing.assert_allclose(got["QK"][h].numpy(), qk, rtol=RTOL, atol=0)
        np.testing.assert_allclose(got["OV"][h].numpy(), ov, rtol=RTOL, atol=0)
    wrong = np.linalg.svd(w_q[0].numpy() @ w_k[1].numpy().T, compute_uv=False)[:d_head]
    assert not np.allclose(got["QK"][0].numpy(), wrong, rtol=1e-3)  # the pairing matters


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor any torch op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_the_maths_never_builds_a_d_model_square_tensor():
    d_model, d_head, n_heads, n_kv = 8192, 64, 4, 2
    g = torch.Generator().manual_seed(0)
    w_q, w_k, w_v = (torch.randn(n, d_model, d_head, generator=g) for n in (n_heads, n_kv, n_kv))
    w_o = torch.randn(n_heads, d_head, d_model, generator=g)
    start = time.perf_counter()
    with _Shapes() as seen:
        got = spectra.circuit_singular_values(w_q, w_k, w_v, w_o, kv_groups(n_heads, n_kv))
        spectra.factored_singular_values(w_q[0], w_k[0].T)
    elapsed = time.perf_counter() - start
    largest = max(seen.shapes, key=lambda fs: math.prod(fs[1]))
    assert seen.shapes and math.prod(largest[1]) <= n_heads * d_model * d_head, largest  # the inputs' float64 copies
    assert not [fs for fs in seen.shapes if sum(d >= d_model for d in fs[1]) >= 2], "a d_model x d_model tensor"
    assert got["QK"].shape == (n_heads, d_head) and elapsed < 30  # a dense 8192² float64 SVD takes minutes
    # one head against numpy by another exact route (thin SVD of A = U S Vᵀ, then A B = U (S Vᵀ B)), as a dense
    # 8192² SVD would take minutes
    _, sa, vta = np.linalg.svd(w_q[1].double().numpy(), full_matrices=False)
    ref = np.linalg.svd((sa[:, None] * vta) @ w_k[0].double().numpy().T, compute_uv=False)
    np.testing.assert_allclose(got["QK"][1].numpy(), ref, rtol=RTOL, atol=0)


def test_mps_computes_on_the_cpu_and_other_devices_are_kept():
    assert spectra.compute_device("mps") == torch.device("cpu")
    assert spectra.compute_device(torch.device("cpu")) == torch.device("cpu")
    assert spectra.compute_device("cuda:1") == torch.device("cuda:1")


def test_shape_errors_name_the_shapes_and_the_fix():
    with pytest.raises(ShapeError, match=r"\(32, 4\) and \(5, 32\); the last axis of A"):
        spectra.factored_singular_values(torch.ones(32, 4), torch.ones(5, 32))
    with pytest.raises(ShapeError, match="6 query heads cannot share 4 key/value heads"):
        kv_groups(6, 4)
    with pytest.raises(ShapeError, match=r"expected singular values \(n, k\)"):
        spectra.spectrum_metrics(np.ones(3), d_model=8)


class _Attn:
    """An attention module exposing weights the way HookedTransformer's GroupedQueryAttention does: ``W_K``
    repeated per query head, the grouped weights as ``_W_K`` / ``_W_V``."""

    def __init__(self, rng, n_heads=4, n_kv=2, d_model=12, d_head=3):
        t = lambda *s: torch.from_numpy(rng.standard_normal(s))  # noqa: E731
        self.W_Q, self.W_O = t(n_heads, d_model, d_head), t(n_heads, d_head, d_model)
        self._W_K, self._W_V = t(n_kv, d_model, d_head), t(n_kv, d_model, d_head)
        self.W_K = self._W_K.repeat_interleave(n_heads // n_kv, dim=0)
        self.W_V = self._W_V.repeat_interleave(n_heads // n_kv, dim=0)


def test_layer_weights_reads_grouped_weights_however_they_are_exposed(rng):
    attn = _Attn(rng)
    lw = layer_weights(attn, 3, n_kv_heads=2)
    assert lw.layer == 3 and lw.n_heads == 4 and lw.n_kv_heads == 2 and lw.kv_head.tolist() == [0, 0, 1, 1]
    assert torch.equal(lw.w_k, attn._W_K) and torch.equal(lw.w_v, attn._W_V)
    del attn._W_K, attn._W_V  # only the repeated W_K/W_V: one slice per group is kept
    lw = layer_weights(attn, 3, n_kv_heads=2)
    assert torch.equal(lw.w_k, attn.W_K[::2]) and torch.equal(lw.w_v, attn.W_V[::2])
