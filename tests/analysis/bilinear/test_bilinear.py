"""analysis.bilinear.decompose, .hosvd and .evaluate on random layers: the exactness identity uᵀout = Σ λ_i (v_i·x̃)²,
batched = single = naive 3-tensor path, HOSVD against numpy's SVD of the flattened tensor,
truncation, input-space maps and typed errors. References are plain numpy float64."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from analysis.bilinear import decompose as bl
from analysis.bilinear import evaluate as ev
from analysis.bilinear.hosvd import hosvd
from analysis.errors import ConfigError, ShapeError

RTOL = 1e-5  # the bar; float64 reaches ~1e-12


def make_layer(rng, d_in=7, d_hidden=11, d_out=5, bias="none", gate_act="linear") -> bl.BilinearWeights:
    w, v, p = (rng.standard_normal(s) for s in ((d_hidden, d_in), (d_hidden, d_in), (d_out, d_hidden)))
    b = {"none": (None, None, None),
         "all": tuple(rng.standard_normal(n) for n in (d_hidden, d_hidden, d_out)),
         "gate_only": (rng.standard_normal(d_hidden), None, None),
         "out_only": (None, None, rng.standard_normal(d_out))}[bias]
    return bl.BilinearWeights(torch.tensor(w), torch.tensor(v), torch.tensor(p), *map(_t, b), gate_act=gate_act)


def _t(a):
    return None if a is None else torch.tensor(a)


def numpy_forward(layer: bl.BilinearWeights, x: np.ndarray) -> np.ndarray:
    """Independent reference: P((Wx + b_w) * (Vx + b_v)) + b_p in numpy."""
    n = lambda t: np.zeros(1) if t is None else t.numpy()  # noqa: E731
    h = (x @ layer.w.numpy().T + n(layer.w_bias)) * (x @ layer.v.numpy().T + n(layer.v_bias))
    return h @ layer.p.numpy().T + n(layer.p_bias)


def numpy_q(layer: bl.BilinearWeights, u: np.ndarray) -> np.ndarray:
    """Q(u) from the definition Σ_a u_a B_a with B built by explicit loops over a (small sizes)."""
    w, v = (t.numpy() for t in layer.folded())
    p = layer.p.numpy()
    q = np.zeros((w.shape[1], w.shape[1]))
    for a in range(p.shape[0]):
        b_a = sum(p[a, h] * np.outer(w[h], v[h]) for h in range(p.shape[1]))
        if layer.p_bias is not None:
            b_a[-1, -1] += layer.p_bias.numpy()[a]
        q += u[a] * b_a
    return (q + q.T) / 2


BIASES = ["none", "all", "gate_only", "out_only"]


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("kind", ["random", "basis", "batch"])
def test_exactness_identity(rng, bias, kind):
    layer = make_layer(rng, bias=bias)
    u = {"random": rng.standard_normal(layer.d_out), "basis": np.eye(layer.d_out)[2],
         "batch": rng.standard_normal((6, layer.d_out))}[kind]
    x = rng.standard_normal((40, layer.d_in))
    dec = bl.decompose(layer, u)
    want = numpy_forward(layer, x) @ np.atleast_2d(u).T  # (batch, k)
    got = ev.contributions(dec, x).sum(-1)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    # and the quadratic form itself
    xt = np.concatenate([x, np.ones((40, 1))], 1) if layer.biased else x
    q = bl.interaction_matrices(layer, u).numpy()
    np.testing.assert_allclose(np.einsum("bi,kij,bj->bk", xt, q, xt), want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    np.testing.assert_allclose(layer.forward(x).numpy(), numpy_forward(layer, x), rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("bias", BIASES)
def test_q_matches_definition_and_naive_tensor_path(rng, bias):
    layer = make_layer(rng, d_in=5, d_hidden=6, d_out=4, bias=bias)
    u = rng.standard_normal((3, layer.d_out))
    fast = bl.interaction_matrices(layer, u).numpy()
    naive = bl.naive_interaction_matrices(layer, u).numpy()
    ref = np.stack([numpy_q(layer, row) for row in u])
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(naive, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(fast, fast.transpose(0, 2, 1))  # symmetric, exactly
    assert fast.shape == (3, layer.n, layer.n) and layer.n == 5 + (bias != "none")


@pytest.mark.parametrize("chunk", [1, 2, 5, None])
def test_batched_equals_single_direction(rng, chunk):
    layer = make_layer(rng, bias="all")
    u = rng.standard_normal((5, layer.d_out))
    batched = bl.interaction_matrices(layer, u, chunk_size=chunk).numpy()
    single = np.stack([bl.interaction_matrices(layer, row).numpy()[0] for row in u])
    np.testing.assert_allclose(batched, single, rtol=1e-13, atol=1e-13)
    dec_b, dec_s = bl.decompose(layer, u), [bl.decompose(layer, row) for row in u]
    np.testing.assert_allclose(dec_b.eigenvalues, np.concatenate([d.eigenvalues for d in dec_s]), rtol=1e-12)


def test_eigendecomposition_sorted_orthonormal_and_reconstructs(rng):
    layer = make_layer(rng, d_in=9, d_hidden=20, bias="all")
    u = rng.standard_normal((4, layer.d_out))
    dec = bl.decompose(layer, u, labels=[f"u{i}" for i in range(4)])
    q = bl.interaction_matrices(layer, u).numpy()
    for k in range(4):
        lam, vec = dec.eigenvalues[k], dec.eigenvectors[k]
        assert np.all(np.diff(np.abs(lam)) <= 1e-15)  # |λ| descending
        np.testing.assert_allclose(vec @ vec.T, np.eye(layer.n), atol=1e-12)
        np.testing.assert_allclose(vec.T @ np.diag(lam) @ vec, q[k], atol=1e-12)
        np.testing.assert_allclose(np.sort(lam), np.linalg.eigvalsh(q[k]), atol=1e-12)
        peaks = vec[np.arange(layer.n), np.abs(vec).argmax(1)]
        assert (peaks > 0).all()  # sign convention
    assert dec.labels == ("u0", "u1", "u2", "u3") and dec.exact and not dec.notes
    assert not dec.eigenvalues.flags.writeable


def test_effective_rank_reference():
    np.testing.assert_allclose(bl.effective_rank(np.array([3.0, -3.0, 3.0, 0.0])), 3.0)
    np.testing.assert_allclose(bl.effective_rank(np.array([2.0, 0.0, 0.0])), 1.0)
    lam = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(bl.effective_rank(lam), [(1.75**2) / (1 + 0.25 + 0.0625), 0.0])


@pytest.mark.parametrize("bias", ["none", "all"])
def test_hosvd_matches_numpy_svd_of_flattened_tensor(rng, bias):
    layer = make_layer(rng, d_in=6, d_hidden=9, d_out=5, bias=bias)
    b = bl.interaction_tensor(layer).numpy()
    flat = ((b + b.transpose(0, 2, 1)) / 2).reshape(layer.d_out, -1)
    u_ref, s_ref, _ = np.linalg.svd(flat, full_matrices=False)
    h = hosvd(layer)
    np.testing.assert_allclose(h.singular_values, s_ref, rtol=1e-10)
    for r in range(layer.d_out):  # left singular vectors up to sign
        np.testing.assert_allclose(abs(h.directions[r] @ u_ref[:, r]), 1.0, atol=1e-8)
        q = bl.interaction_matrices(layer, h.directions[r]).numpy()[0]
        np.testing.assert_allclose(np.linalg.norm(q), s_ref[r], rtol=1e-10)  # σ_r = ‖Q(u_r)‖_F
        lam = np.linalg.eigvalsh(q)
        assert lam[np.abs(lam).argmax()] > 0  # sign convention: top-|λ| eigenvalue positive
    assert len(hosvd(layer, 2).singular_values) == 2


def test_truncation_curve_full_is_exact_and_matches_loop(rng):
    layer = make_layer(rng, d_in=6, d_hidden=10, d_out=4, bias="all")
    u = rng.standard_normal((3, layer.d_out))
    x = rng.standard_normal((50, layer.d_in))
    offsets = rng.standard_normal(3)
    dec = bl.decompose(layer, u)
    full = numpy_forward(layer, x) @ u.T + offsets
    labels = full.argmax(1)
    labels[:5] = (labels[:5] + 1) % 3  # a few "wrong" labels: full accuracy 0.9
    curve = ev.truncation_curve(dec, x, offsets=offsets, labels=labels)
    assert list(curve.ks) == list(range(layer.n + 1))
    np.testing.assert_allclose(curve.accuracy[-1], 0.9)
    np.testing.assert_allclose([curve.agreement[-1], curve.relative_error[-1]], [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(curve.relative_error[0], 1.0)
    for k in (0, 2, 4):  # independent loop over the kept eigenvectors
        xt = np.concatenate([x, np.ones((50, 1))], 1)
        out = np.stack([sum(dec.eigenvalues[d, i] * (xt @ dec.eigenvectors[d, i]) ** 2 for i in range(k))
                        + np.zeros(50) for d in range(3)], 1) + offsets
        np.testing.assert_allclose(curve.accuracy[k], (out.argmax(1) == labels).mean())
        np.testing.assert_allclose(curve.agreement[k], (out.argmax(1) == full.argmax(1)).mean())


def test_swiglu_gate_warns_and_flags_bilinear_part(rng):
    layer = make_layer(rng, gate_act="silu")
    with pytest.warns(bl.BilinearPartWarning, match="only its bilinear part"):
        dec = bl.decompose(layer, rng.standard_normal(layer.d_out))
    assert not dec.exact and "silu" in dec.notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bl.decompose(make_layer(rng, gate_act="linear"), np.ones(5)).exact


def test_token_scores_and_embedding_map(rng):
    layer = make_layer(rng, d_in=4, bias="all")
    dec = bl.decompose(layer, rng.standard_normal(layer.d_out))
    tokens = rng.standard_normal((30, 4))
    scores = ev.token_scores(dec.eigenvectors[0, :3], tokens, biased=True)
    np.testing.assert_allclose(scores, dec.eigenvectors[0, :3, :4] @ tokens.T + dec.eigenvectors[0, :3, 4:5])
    emb, bias = rng.standard_normal((4, 9)), rng.standard_normal(4)  # e = E x + b, x has 9 raw features
    raw = rng.standard_normal(9)
    img = ev.through_embedding(dec.eigenvectors[0], emb)  # (n, 9)
    v = dec.eigenvectors[0]
    np.testing.assert_allclose(v[:, :4] @ (emb @ raw + bias), img @ raw + v[:, :4] @ bias)
    pos, neg = ev.top_signed(np.array([3.0, -2.5, 2.0, -1.0, 0.5]), 2)
    assert list(pos) == [0, 2] and list(neg) == [1, 3]


def test_bad_directions_raise_typed_errors(rng):
    layer = make_layer(rng, d_out=5)
    with pytest.raises(ShapeError, match=r"does not fit bilinear, which writes d_out=5 outputs; give a \(5,\)"):
        bl.decompose(layer, np.ones(4))
    with pytest.raises(ShapeError, match="d_out=5"):
        bl.interaction_matrices(layer, np.ones((2, 2, 5)))
    with pytest.raises(ConfigError, match=r"direction 1 \(b\) is the zero vector"):
        bl.decompose(layer, np.stack([np.ones(5), np.zeros(5)]), labels=["a", "b"])
    with pytest.raises(ConfigError, match="direction 0 holds NaN or Inf"):
        bl.decompose(layer, np.full(5, np.nan))
    with pytest.raises(ConfigError, match="2 labels for 1 directions"):
        bl.decompose(layer, np.ones(5), labels=["a", "b"])


def test_bad_layers_and_inputs_raise_typed_errors(rng):
    w = torch.tensor(rng.standard_normal((6, 4)))
    with pytest.raises(ShapeError, match=r"need W and V of equal shape \(d_hidden, d_in\)"):
        bl.BilinearWeights(w, w[:, :3], torch.ones(2, 6))
    with pytest.raises(ShapeError, match="must be 2-D"):
        bl.BilinearWeights(w, w, torch.ones(6))
    with pytest.raises(ShapeError, match=r"p_bias has shape \(3,\), expected \(2,\)"):
        bl.BilinearWeights(w, w, torch.ones(2, 6), p_bias=torch.ones(3))
    with pytest.raises(ConfigError, match="w holds NaN or Inf"):
        bl.BilinearWeights(w * float("nan"), w, torch.ones(2, 6))
    dec = bl.decompose(bl.BilinearWeights(w, w, torch.ones(2, 6)), np.ones(2))
    with pytest.raises(ShapeError, match=r"inputs must be \(batch, d_in=4\)"):
        ev.contributions(dec, np.ones((3, 5)))
    with pytest.raises(ConfigError, match="truncation ks must lie in 0..4"):
        ev.truncation_curve(dec, np.ones((3, 4)), ks=[9])
