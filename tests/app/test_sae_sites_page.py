"""Compare SAEs page: SAEs of one layer at different sites are plotted apart (one site at a time)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from _support import open_sae_compare


def test_compare_page_separates_sites_of_a_layer(tmp_path, monkeypatch, streamlit_caches_cleared):
    saes = pd.DataFrame({"key": [c * 64 for c in "abc"], "name": ["z1", "z2", "r1"], "model": ["tiny"] * 3,
                         "layer": [1, 1, 1], "site": ["hook_z", "hook_z", "resid_post"],
                         "architecture": ["topk"] * 3, "l0": [4.0, 8.0, 4.0], "nmse": [0.3, 0.2, 0.1],
                         "explained_variance_saelens": [0.7, 0.8, 0.9], "loss_recovered": [np.nan] * 3,
                         "dead_fraction": [0.0] * 3})
    at = open_sae_compare(monkeypatch, tmp_path / "store", saes)
    box = at.selectbox(key="cmp_layer")
    assert box.options == ["blocks.1.attn.hook_z", "layer 1 resid_post"]
    assert any("2 evaluated SAE(s) of tiny at layer 1 (hook_z)" in c.value for c in at.caption)
    box.set_value((1, "resid_post")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("1 evaluated SAE(s) of tiny at layer 1 (resid_post)" in c.value for c in at.caption)
