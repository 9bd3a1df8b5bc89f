"""Every architecture ``sae.config.ARCHITECTURES`` lists goes through the evaluation and the feature browser's
data: reconstruction metrics, ground-truth scores and ``sae.features.feature_data`` on an SAE built from its
config (a newly added architecture is picked up by the parametrisation without a change here).

Independent truths: the SAE's own ``encode`` (density and max activation of each feature, computed here), and
the decoder identity (an SAE whose decoder is the true dictionary recovers it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.config import ARCHITECTURES, SAEConfig
from sae.features import feature_data
from sae.ground_truth import score
from sae.groundtruth_job import architecture_fields
from sae.metrics import reconstruction_metrics
from sae.model import SAE
from sae.synthetic import SyntheticSpec, dictionary, sample

SPEC = SyntheticSpec(n_features=24, d_in=12, mean_l0=2.0, n_parents=2, n_children=2, n_correlated_pairs=1)


def _sae(arch: str) -> SAE:
    """An SAE of ``arch`` whose decoder is the true dictionary and whose encoder is its transpose."""
    cfg = SAEConfig(d_in=SPEC.d_in, d_sae=SPEC.n_features, **architecture_fields(arch, k=3, l1_coefficient=1.0,
                                                                                 d_sae=SPEC.n_features))
    sae = SAE(cfg)
    D = torch.from_numpy(dictionary(SPEC)).float()
    with torch.no_grad():
        sae.W_dec.copy_(D)
        if hasattr(sae, "W_enc"):
            sae.W_enc.copy_(D.T)
    return sae


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_is_evaluated_and_browsable(arch):
    sae = _sae(arch)
    b = sample(SPEC, 600, seed=5)
    x = torch.from_numpy(b.x.astype(np.float32))
    with torch.no_grad():
        f = sae.encode(x).double().numpy()
    rec = reconstruction_metrics(sae, x)
    np.testing.assert_allclose(rec.density, (f > 0).mean(0), rtol=1e-12)
    s = score(sae.W_dec.detach().double().numpy(), dictionary(SPEC), f, b.coefficients, SPEC.parents,
              [SPEC.children(p) for p in SPEC.parents], only_alive=False)
    assert s.recovery.mcc == pytest.approx(1.0, abs=1e-6) and s.recovery.recall == 1.0
    docs = np.repeat(np.arange(60), 10)
    fd = feature_data(sae, b.x.astype(np.float32), np.arange(600) % 50, docs, np.tile(np.arange(10), 60), n_top=3,
                      n_bins=5)
    np.testing.assert_allclose(fd.density, (f > 0).mean(0), rtol=1e-6)
    np.testing.assert_allclose(fd.max_act, f.max(0), rtol=1e-5, atol=1e-6)
