"""Spectra and conditioning against independent references: numpy/scipy float64 SVD and
rank, matrices built with known singular values, WeightWatcher's power-law fit, Pareto
samples with a known exponent, and hand formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.weights import spectra
from analysis.errors import ShapeError
from analysis.weights import singular_values as sv_mod
from analysis.weights.spectra import (powerlaw_fit, singular_values, singular_values_batch, spectrum_metrics,
                              weight_spectra, welore_fraction)

SV_TOL = 1e-6  # singular values: |s - s_ref| <= SV_TOL * s_max
KAPPA_TOL = 1e-6  # kappa relative to numpy.linalg.cond of the float64 upcast


def with_singular_values(rng: np.random.Generator, rows: int, cols: int, s: np.ndarray) -> np.ndarray:
    """U diag(s) Vᵀ with random orthonormal U (rows, k), V (cols, k): known singular values."""
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return (u * s) @ v.T


def assert_sv_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert np.all(np.diff(got) <= 0), "singular values must be descending"
    np.testing.assert_allclose(got, ref, rtol=0, atol=SV_TOL * ref[0])


def np_sv(w) -> np.ndarray:
    w = w.to(torch.float64).numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float64)
    return np.linalg.svd(w, compute_uv=False)


def table_row(ws, label: str) -> dict:
    t = ws.table.set_index("matrix")
    return t.loc[label].to_dict()


# --- singular values ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 64), (300, 40), (40, 300), (1, 17), (17, 1), (257, 128)], ids=str)
def test_singular_values_match_numpy_svd(shape, rng):
    w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    sv, routes = singular_values_batch(w[None])
    assert_sv_close(sv[0], np_sv(w))
    assert routes == ["gram"]


@pytest.mark.parametrize("shape", [(96, 96), (200, 80), (80, 200)], ids=str)
def test_ill_conditioned_kappa_1e6_falls_back_to_svd(shape, rng):
    k = min(shape)
    s_true = np.geomspace(3.0, 3e-6, k)  # kappa = 1e6
    w = torch.from_numpy(with_singular_values(rng, *shape, s_true))
    sv, routes = singular_values_batch(w[None])
    assert routes == ["svd"]  # the Gram route would lose s_min (error ~ eps·kappa²)
    assert_sv_close(sv[0], np_sv(w))
    np.testing.assert_allclose(sv[0], s_true, rtol=1e-8)  # relative accuracy even for s_min
    row = spectrum_metrics(sv[0], *shape)
    np.testing.assert_allclose(row["kappa"], np.linalg.cond(w.numpy()), rtol=KAPPA_TOL)
    np.testing.assert_allclose(row["kappa"], 1e6, rtol=1e-6)


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e3, 9e3, 2e4, 1e6, 1e9, 1e11])
def test_kappa_matches_numpy_cond(kappa, rng):
    w = with_singular_values(rng, 120, 70, np.geomspace(2.0, 2.0 / kappa, 70))
    sv, routes = singular_values_batch(torch.from_numpy(w)[None])
    row = spectrum_metrics(sv[0], 120, 70)
    np.testing.assert_allclose(row["kappa"], np.linalg.cond(w), rtol=KAPPA_TOL)
    np.testing.assert_allclose(row["log10_kappa"], math.log10(np.linalg.cond(w)), atol=1e-6)
    assert routes == ["gram" if kappa < spectra.GRAM_KAPPA_LIMIT else "svd"]


def test_float32_weights_kappa_matches_cond_of_upcast(rng):
    w = torch.from_numpy(rng.standard_normal((512, 384)).astype(np.float32))
    ws = weight_spectra([("layers.0.w.weight", w)])
    row = table_row(ws, "layers.0.w.weight")
    np.testing.assert_allclose(row["kappa"], np.linalg.cond(w.double().numpy()), rtol=KAPPA_TOL)
    assert_sv_close(ws.singular_values["layers.0.w.weight"], np_sv(w))


def test_batch_matches_per_matrix_svd(rng):
    w = torch.from_numpy(rng.standard_normal((5, 48, 32)))
    w[3] = torch.from_numpy(with_singular_values(rng, 48, 32, np.geomspace(1, 1e-7, 32)))  # one ill-conditioned
    sv, routes = singular_values_batch(w)
    assert sv.shape == (5, 32)
    for b in range(5):
        assert_sv_close(sv[b], np_sv(w[b]))
    assert routes[3] == "svd" and routes.count("gram") == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs_are_upcast_exactly(dtype, rng):
    w = torch.from_numpy(rng.standard_normal((80, 50)).astype(np.float32)).to(dtype)
    ref = np_sv(w)  # numpy SVD of the exact float64 upcast
    sv, _ = singular_values_batch(w[None])
    assert_sv_close(sv[0], ref)
    ws = weight_spectra([("h.0.mlp.weight", w)])
    row = table_row(ws, "h.0.mlp.weight")
    assert row["dtype"] == str(dtype).removeprefix("torch.")
    np.testing.assert_allclose(row["kappa"], np.linalg.cond(w.double().numpy()), rtol=KAPPA_TOL)
    # 16-bit weights: numerical rank uses float32's eps (documented), as matrix_rank would on float32
    assert row["numerical_rank"] == np.linalg.matrix_rank(w.float().numpy())


def test_transposed_and_noncontiguous_views(rng):
    base = torch.from_numpy(rng.standard_normal((70, 130)).astype(np.float32))
    for w in (base.T, base[:, ::2], base[::3]):
        sv, _ = singular_values_batch(w[None])
        assert_sv_close(sv[0], np_sv(w))


def test_stacked_experts_are_analysed_per_expert(rng):
    experts = torch.from_numpy(rng.standard_normal((3, 40, 24)).astype(np.float32))
    experts[1] *= 5.0
    ws = weight_spectra([("model.layers.2.mlp.experts.w1", experts)])
    assert list(ws.table["matrix"]) == [f"model.layers.2.mlp.experts.w1[expert={k}]" for k in range(3)]
    assert list(ws.table["expert"]) == [0, 1, 2]
    assert set(ws.table["n_params"]) == {40 * 24}
    for k in range(3):
        label = f"model.layers.2.mlp.experts.w1[expert={k}]"
        assert_sv_close(ws.singular_values[label], np_sv(experts[k]))
        np.testing.assert_allclose(table_row(ws, label)["kappa"], np.linalg.cond(experts[k].double().numpy()),
                                   rtol=KAPPA_TOL)


def test_conv_weight_is_reshaped_to_out_by_fan_in(rng):
    conv = torch.from_numpy(rng.standard_normal((16, 8, 3, 3)).astype(np.float32))
    ws = weight_spectra([("features.0.weight", conv)])
    row = table_row(ws, "features.0.weight")
    assert (row["rows"], row["cols"]) == (16, 72)
    assert_sv_close(ws.singular_values["features.0.weight"], np_sv(conv.reshape(16, 72)))


def test_large_matrix_split_gram_and_small_blocks_match_numpy(rng, monkeypatch):
    # Force the code paths that big embeddings take: many row blocks, Gram split over workers.
    monkeypatch.setattr(sv_mod, "GRAM_BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(spectra, "SPLIT_ELEMENTS", 5000)
    monkeypatch.setattr(sv_mod, "n_workers", lambda: 2)
    tall = torch.from_numpy(rng.standard_normal((900, 60)).astype(np.float32))
    wide = torch.from_numpy(rng.standard_normal((50, 700)).astype(np.float32)).to(torch.bfloat16)
    ws = weight_spectra([("emb.weight", tall), ("head.weight", wide)])
    assert_sv_close(ws.singular_values["emb.weight"], np_sv(tall))
    assert_sv_close(ws.singular_values["head.weight"], np_sv(wide))
    assert list(ws.table["route"]) == ["gram", "gram"]


def test_singular_values_exact_helper_and_shape_errors(rng):
    w = torch.from_numpy(rng.standard_normal((9, 5)))
    assert_sv_close(singular_values(w), np_sv(w))
    with pytest.raises(ShapeError, match=r"expected \(batch, rows, cols\) with no empty axis, got \(3, 4\)"):
        singular_values_batch(torch.zeros(3, 4))
    with pytest.raises(ShapeError, match=r"got \(2, 0, 4\)"):
        singular_values_batch(torch.zeros(2, 0, 4))


# --- kappa = inf, ranks --------------------------------------------------------------------

def test_zero_and_rank_one_matrices_have_infinite_kappa(rng):
    u, v = rng.standard_normal(30), rng.standard_normal(20)
    ws = weight_spectra([("a.zero.weight", torch.zeros(30, 20)),
                         ("a.rank1.weight", torch.from_numpy(np.outer(u, v)))])
    zero, rank1 = table_row(ws, "a.zero.weight"), table_row(ws, "a.rank1.weight")
    assert zero["status"] == rank1["status"] == "ok"
    assert zero["kappa"] == math.inf and zero["numerical_rank"] == 0 and zero["stable_rank"] == 0.0
    assert rank1["kappa"] == math.inf and rank1["log10_kappa"] == math.inf
    assert rank1["numerical_rank"] == 1 == np.linalg.matrix_rank(np.outer(u, v))
    np.testing.assert_allclose(rank1["sigma_max"], np.linalg.norm(u) * np.linalg.norm(v), rtol=1e-12)
    np.testing.assert_allclose(rank1["stable_rank"], 1.0, rtol=1e-12)


@pytest.mark.parametrize("rank", [1, 7, 25])
def test_rank_formulas_by_hand(rank, rng):
    w = rng.standard_normal((40, rank)) @ rng.standard_normal((rank, 25))
    sv, _ = singular_values_batch(torch.from_numpy(w)[None])
    m = spectrum_metrics(sv[0], 40, 25)
    s = np.linalg.svd(w, compute_uv=False)
    assert m["numerical_rank"] == np.linalg.matrix_rank(w) == rank
    np.testing.assert_allclose(m["stable_rank"], (s**2).sum() / s[0] ** 2, rtol=1e-10)
    np.testing.assert_allclose(m["frobenius_norm"], np.linalg.norm(w), rtol=1e-10)
    np.testing.assert_allclose(m["spectral_norm"], np.linalg.norm(w, 2), rtol=1e-10)
    p = s[s > s[0] * 1e-12] / s.sum()  # exp of the entropy of s/Σs (Roy & Vetterli)
    np.testing.assert_allclose(m["effective_rank"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)


def test_effective_rank_of_flat_spectrum_is_its_length():
    m = spectrum_metrics(np.full(12, 3.0), 12, 12)
    np.testing.assert_allclose(m["effective_rank"], 12.0, rtol=1e-12)
    np.testing.assert_allclose(m["stable_rank"], 12.0, rtol=1e-12)


# --- power law --------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [2.0, 3.5, 5.0])
def test_powerlaw_recovers_pareto_exponent(alpha, rng):
    x = (rng.pareto(alpha - 1.0, size=4000) + 1.0) * 0.5  # density ∝ x^-alpha for x >= 0.5
    fit = powerlaw_fit(x)
    assert fit.n_tail >= 100
    assert abs(fit.alpha - alpha) < 4 * fit.sigma  # sigma = (alpha-1)/sqrt(n_tail)
    assert fit.ks_distance < 4 / math.sqrt(fit.n_tail)


def _wwfit(data: np.ndarray):
    from weightwatcher.WW_powerlaw import WWFit

    return WWFit(data)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # WW's alpha at tied xmin candidates
@pytest.mark.parametrize("case", ["pareto-300", "esd-256x96", "pareto-2500", "ties"])
def test_powerlaw_equals_weightwatcher_wwfit(case, rng):
    if case == "pareto-300":
        data = rng.pareto(2.0, size=300) + 1.0
    elif case == "esd-256x96":
        data = np.linalg.svd(rng.standard_normal((256, 96)), compute_uv=False) ** 2
    elif case == "pareto-2500":  # several row chunks in our fit
        data = (rng.pareto(3.0, size=2500) + 1.0) * 1e-3
    else:
        data = np.repeat(rng.pareto(1.5, size=40) + 1.0, 3)
    ours, ww = powerlaw_fit(data), _wwfit(data[data > spectra.EVALS_THRESH])
    assert len(data) >= 20  # WW's small-N estimator starts below 20 values; ours never switches
    np.testing.assert_allclose(ours.alpha, ww.alpha, rtol=1e-12)
    np.testing.assert_allclose(ours.ks_distance, ww.D, rtol=1e-12, atol=1e-15)
    assert ours.xmin == ww.xmin
    np.testing.assert_allclose(ours.sigma, ww.sigma, rtol=1e-12)
    assert ours.n_tail == int((data >= ww.xmin).sum())


def test_powerlaw_ignores_values_at_or_below_threshold_and_fails_cleanly():
    assert math.isnan(powerlaw_fit(np.array([1e-9, 1e-6, 2.0])).alpha)  # one value left
    assert math.isnan(powerlaw_fit(np.zeros(50)).alpha)
    assert math.isnan(powerlaw_fit(np.full(50, 2.0)).alpha)  # alpha infinite everywhere: rejected
    data = np.r_[np.full(100, 1e-7), np.linspace(1, 10, 60) ** 3]
    assert powerlaw_fit(data) == powerlaw_fit(data[100:])


# --- Marchenko-Pastur, WeLore ---------------------------------------------------------------

def test_marchenko_pastur_no_spikes_in_gaussian_noise(rng):
    w = rng.standard_normal((1200, 400)) * 0.02
    sv, _ = singular_values_batch(torch.from_numpy(w)[None])
    m = spectrum_metrics(sv[0], 1200, 400)
    assert m["n_spikes"] <= 1
    np.testing.assert_allclose(m["mp_sigma2"], (w**2).mean(), rtol=1e-10)
    np.testing.assert_allclose(m["mp_edge"], 1200 * m["mp_sigma2"] * (1 + math.sqrt(400 / 1200)) ** 2, rtol=1e-12)
    assert m["lambda_max"] <= m["mp_edge"] * 1.05  # the top of the bulk sits at the edge


@pytest.mark.parametrize("k", [1, 3, 6])
def test_marchenko_pastur_counts_planted_spikes(k, rng):
    noise = rng.standard_normal((1200, 400))
    u, _ = np.linalg.qr(rng.standard_normal((1200, k)))
    v, _ = np.linalg.qr(rng.standard_normal((400, k)))
    w = noise + (u * np.linspace(400, 200, k)) @ v.T  # strength far above the edge sqrt(N)(1+1/sqrt(Q)) ≈ 55
    sv, _ = singular_values_batch(torch.from_numpy(w)[None])
    assert spectrum_metrics(sv[0], 1200, 400)["n_spikes"] == k


def test_welore_fraction_by_hand():
    s = np.array([10.0, 6.0, 2.0, 1.5, 1.0])  # normalised: 1, 5/9, 1/9, 1/18, 0
    assert welore_fraction(s, 0.175) == pytest.approx(3 / 5)
    assert welore_fraction(s, 0.05) == pytest.approx(1 / 5)
    assert welore_fraction(np.full(4, 2.0)) == 0.0
    m = spectrum_metrics(s, 5, 5)
    assert m["welore_fraction"] == pytest.approx(3 / 5) and m["low_rank"]


# --- whole models: non-finite, skipped, table ------------------------------------------------

def test_nonfinite_tensors_get_a_status_row_and_the_rest_is_analysed(rng):
    good = torch.from_numpy(rng.standard_normal((20, 10)).astype(np.float32))
    bad = good.clone()
    bad[0, 0], bad[1, 1], bad[2, 2] = float("nan"), float("inf"), float("-inf")
    nan_bf16 = good.to(torch.bfloat16)
    nan_bf16[3, 3] = float("nan")
    ws = weight_spectra([("l.0.a.weight", bad), ("l.0.b.weight", good), ("l.0.c.weight", nan_bf16),
                         ("l.0.a.bias", torch.zeros(20))])
    t = ws.table.set_index("matrix")
    assert t.loc["l.0.a.weight", "status"] == "nonfinite: 1 NaN, 2 Inf"
    assert t.loc["l.0.c.weight", "status"] == "nonfinite: 1 NaN, 0 Inf"
    assert math.isnan(t.loc["l.0.a.weight", "kappa"]) and t.loc["l.0.a.weight", "route"] == "none"
    assert t.loc["l.0.b.weight", "status"] == "ok"
    assert_sv_close(ws.singular_values["l.0.b.weight"], np_sv(good))
    assert set(ws.singular_values) == {"l.0.b.weight"}
    assert [(d["tensor"], d["shape"]) for d in ws.skipped] == [("l.0.a.bias", [20])]
    assert "1-D tensors (biases, norms) have no singular values" in ws.skipped[0]["reason"]


def test_singular_values_batch_marks_nonfinite_matrices(rng):
    w = torch.from_numpy(rng.standard_normal((2, 8, 6)))
    w[1, 2, 3] = float("inf")
    sv, routes = singular_values_batch(w)
    assert routes == ["gram", "nonfinite"] and np.isnan(sv[1]).all()
    assert_sv_close(sv[0], np_sv(w[0]))


def test_table_has_one_row_per_matrix_in_input_order(rng):
    names = [f"blocks.{i}.mlp.weight" for i in (3, 1, 2)]
    ws = weight_spectra([(n, torch.from_numpy(rng.standard_normal((12, 8)))) for n in names], batch_bytes=1)
    assert list(ws.table["matrix"]) == names
    assert list(ws.table["layer"]) == [3, 1, 2]
    assert set(ws.table["module_type"]) == {"mlp"}
    empty = weight_spectra([("b", torch.zeros(3))])
    assert empty.table.empty and "kappa" in empty.table.columns
