"""SAE evaluation metrics (sae/metrics.py) against numpy float64 and scikit-learn.

Independent truths: numpy computations of every definition, scikit-learn's
``explained_variance_score(..., multioutput="variance_weighted")``, SAELens's explained variance
(``sae_lens/evals.py`` ``ExplainedVarianceCalculator``, 6.x: 1 - E||x - x_hat||^2 / (E||x||^2 -
||E x||^2)) written out in numpy, and loss functions whose values are known in closed form.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import explained_variance_score

from analysis.errors import ShapeError
from sae.config import SAEConfig
from sae.metrics import (DENSITY_EDGES, LossRecovered, evaluate, loss_recovered, reconstruction_metrics,
                         recovered_fraction, sae_patch, upgrade_scalars)
from sae.model import SAE


def _sae(rng, d_in=12, d_sae=48, arch="relu", k=None) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
        sae.b_enc.sub_(1.5)  # sparse: most latents off
        sae.normalize_decoder_()
    return sae


@pytest.mark.parametrize("arch, k", [("relu", None), ("topk", 5)])
def test_reconstruction_metrics_match_numpy(arch, k, rng):
    sae = _sae(rng, arch=arch, k=k)
    x = (rng.standard_normal((3000, 12)) * rng.uniform(0.5, 3, 12) + rng.uniform(-4, 4, 12)).astype(np.float32)
    got = reconstruction_metrics(sae, x, chunk=700)  # chunks that do not divide the tokens
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x)).double().numpy()
        x_hat = sae(torch.from_numpy(x)).double().numpy()
    xd = x.astype(np.float64)
    err = xd - x_hat
    assert got.n_tokens == 3000
    assert got.l0 == pytest.approx((f > 0).sum(1).mean(), rel=1e-12)
    assert got.mse == pytest.approx((err ** 2).sum(1).mean(), rel=1e-9)
    assert got.nmse == pytest.approx((err ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum(), rel=1e-9)
    ev = explained_variance_score(xd, x_hat, multioutput="variance_weighted")
    assert got.explained_variance_sklearn == pytest.approx(ev, rel=1e-9)
    saelens = 1 - (err ** 2).sum(1).mean() / ((xd ** 2).sum(1).mean() - (xd.mean(0) ** 2).sum())
    assert got.explained_variance_saelens == pytest.approx(saelens, rel=1e-9)
    assert got.explained_variance_saelens == pytest.approx(1 - got.nmse, rel=1e-12)
    around_zero = 1 - (err ** 2).sum() / (xd ** 2).sum()
    assert got.explained_variance_around_zero == pytest.approx(around_zero, rel=1e-9)
    assert abs(got.explained_variance_sklearn - around_zero) > 0.05  # activations with a mean: the old bug shows
    cos = (xd * x_hat).sum(1) / (np.linalg.norm(xd, axis=1) * np.linalg.norm(x_hat, axis=1))
    assert got.cosine == pytest.approx(cos.mean(), rel=1e-6)
    density = (f > 0).mean(0)
    np.testing.assert_allclose(got.density, density, rtol=1e-12)
    assert got.dead_fraction == pytest.approx((density == 0).mean())
    assert got.dense_fraction == pytest.approx((density > 0.1).mean())
    np.testing.assert_array_equal(got.density_hist, np.histogram(np.log10(density + 1e-10), DENSITY_EDGES)[0])
    np.testing.assert_allclose(got.log10_density, np.log10(density + 1e-10), rtol=1e-6)
    assert not got.density.flags.writeable


def test_explained_variance_differs_from_one_minus_nmse_by_the_mean_residual(rng):
    """An exact SAE (x_hat = ReLU(x) - ReLU(-x) = x), then one whose output is off by a constant
    vector: explained variance ignores a constant residual, NMSE counts it."""

    class Offset(SAE):
        delta = torch.zeros(6)

        def decode(self, f):
            return super().decode(f) + self.delta

    sae = Offset(SAEConfig(d_in=6, d_sae=12))
    eye = torch.eye(6)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = rng.standard_normal((500, 6)).astype(np.float32)
    exact = reconstruction_metrics(sae, x)
    assert exact.nmse == pytest.approx(0, abs=1e-12) and exact.explained_variance_sklearn == pytest.approx(1)
    assert exact.explained_variance_saelens == pytest.approx(1)
    assert exact.cosine == pytest.approx(1, abs=1e-6) and exact.l0 == pytest.approx(6)
    Offset.delta = torch.tensor([0.5, 0, 0, 0, 0, -0.5])
    off = reconstruction_metrics(sae, x)
    xd = x.astype(np.float64)
    assert off.explained_variance_sklearn == pytest.approx(1, abs=1e-6)
    assert off.nmse == pytest.approx(0.5 * len(x) / ((xd - xd.mean(0)) ** 2).sum(), rel=1e-6)
    assert off.explained_variance_saelens == pytest.approx(1 - off.nmse, rel=1e-12)
    assert off.explained_variance_saelens < off.explained_variance_sklearn - 1e-4  # SAELens counts the offset


def test_scalars_name_both_explained_variances_and_old_results_upgrade(rng):
    sae = _sae(rng)
    x = (rng.standard_normal((400, 12)) + 2).astype(np.float32)
    s = evaluate(sae, x).scalars()
    assert "explained_variance" not in s  # the ambiguous name is gone
    assert s["explained_variance_saelens"] == pytest.approx(1 - s["nmse"], rel=1e-12)
    assert upgrade_scalars(s) == s  # today's results pass through unchanged
    # a result stored before the split: the sklearn value under "explained_variance", no SAELens value
    old = {k: v for k, v in s.items() if not k.startswith("explained_variance_s")}
    old["explained_variance"] = s["explained_variance_sklearn"]
    new = upgrade_scalars(old)
    assert "explained_variance" not in new
    assert new["explained_variance_sklearn"] == s["explained_variance_sklearn"]
    assert new["explained_variance_saelens"] == pytest.approx(s["explained_variance_saelens"], rel=1e-12)
    assert np.isnan(upgrade_scalars({"nmse": float("nan")})["explained_variance_saelens"])


def test_metrics_reject_wrong_width(rng):
    with pytest.raises(ShapeError, match="do not fit the SAE \\(d_in=12"):
        reconstruction_metrics(_sae(rng), np.zeros((5, 10), dtype=np.float32))


def test_loss_recovered_with_known_losses(rng):
    assert recovered_fraction(clean=2.0, sae=2.5, zero=4.0) == pytest.approx(0.75)
    assert np.isnan(recovered_fraction(1.0, 1.0, 1.0))
    z0 = torch.from_numpy(rng.standard_normal((2, 3, 4, 5)).astype(np.float32))  # [batch, pos, heads, d_head]
    sae = SAE(SAEConfig(d_in=20, d_sae=40))

    def loss_fn(patch):
        """1 + ||patch(z0) - z0||^2 / ||z0||^2: clean 1, zero-ablated 2."""
        z = z0 if patch is None else patch(z0)
        assert z.shape == z0.shape
        return 1.0 + float(((z - z0) ** 2).sum() / (z0 ** 2).sum())

    got = loss_recovered(sae, loss_fn)
    with torch.no_grad():
        err = float(((sae(z0.reshape(2, 3, 20)) - z0.reshape(2, 3, 20)) ** 2).sum() / (z0 ** 2).sum())
    assert (got.clean, got.zero) == (1.0, 2.0)
    assert got.sae == pytest.approx(1 + err, rel=1e-6)
    assert got.recovered == pytest.approx(1 - err, rel=1e-6)
    with pytest.raises(ShapeError, match="hook_z flattens to width 12 but the SAE has d_in=20"):
        sae_patch(sae)(torch.zeros(1, 2, 3, 4))
    ev = evaluate(sae, z0.reshape(-1, 20).numpy(), loss_fn)
    assert isinstance(ev.loss, LossRecovered) and ev.scalars()["loss_recovered"] == got.recovered
