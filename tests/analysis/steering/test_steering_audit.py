"""Audit of weight edits: the norm-preserving edit keeps every slice's norm and removes the direction; the
per-tensor metrics are the weights analysis's on the edited tensors; the PEFT LoRA adapter that peft loads
reproduces the orthogonalised checkpoint's logits; the bias weight edit reproduces the steering hook.

Independent truths: numpy norms and projections; ``spectrum_metrics`` of ``np.linalg.svd``; peft's own
``PeftModel.from_pretrained`` and ``merge_and_unload`` against the checkpoint ``steer_orthogonalize`` writes;
the steered bridge's logits against the edited checkpoint's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny_llama import make_tiny_llama

from analysis.sources import open_source
from analysis.steering import audit as au
from analysis.steering import pipeline_audit as pa
from analysis.steering.hooks import orthonormal_basis
from analysis.steering.vectors import SteeringVector
from analysis.weights.spectra import spectrum_metrics


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("steer-audit") / "llama", tie=True)


@pytest.fixture(scope="module")
def vec(lm_dir):
    src = open_source(lm_dir)
    rows = np.random.default_rng(1).standard_normal((2, 32))
    return SteeringVector(rows.astype(np.float32), (1,), method="svd", k=2, fingerprint=src.fingerprint)


@pytest.mark.parametrize("axis", [0, 1])
def test_the_norm_preserving_edit_removes_the_span_and_keeps_each_slice_norm(rng, axis):
    w = torch.from_numpy(rng.standard_normal((16, 24) if axis == 0 else (24, 16)))
    basis = orthonormal_basis(rng.standard_normal((3, 16)), 16)
    got = au.edit_tensor(w, basis, axis, "norm_preserving").numpy()
    x, g, b = np.moveaxis(w.numpy(), axis, -1), np.moveaxis(got, axis, -1), basis.numpy()
    np.testing.assert_allclose(np.linalg.norm(g, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    assert np.abs(g @ b.T).max() < 1e-12 * np.abs(x).max()
    proj = x - (x @ b.T) @ b  # same direction as the plain projection
    cos = (g * proj).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(proj, axis=-1))
    np.testing.assert_allclose(cos, 1.0, rtol=1e-12)


def test_tensor_metrics_are_the_weights_analysis_of_the_edited_tensor(rng):
    w = torch.from_numpy(rng.standard_normal((20, 12)))
    basis = orthonormal_basis(rng.standard_normal((1, 20)), 20)
    new = au.edit_tensor(w, basis, 0, "orthogonalized")
    row = au.tensor_audit("w", w, new, "orthogonalized")
    want = spectrum_metrics(np.linalg.svd(new.numpy(), compute_uv=False), 20, 12)
    assert row["kappa_after"] == pytest.approx(want["kappa"], rel=1e-8)
    assert row["stable_rank_after"] == pytest.approx(want["stable_rank"], rel=1e-10)
    assert row["alpha_after"] == pytest.approx(want["alpha"], rel=1e-8)
    assert row["rel_change"] == pytest.approx(np.linalg.norm(new.numpy() - w.numpy()) / np.linalg.norm(w.numpy()))


@pytest.mark.parametrize("axis", [0, 1])
def test_lora_factors_rebuild_the_orthogonalised_delta(rng, axis):
    w = torch.from_numpy(rng.standard_normal((16, 10) if axis == 0 else (30, 16)))
    basis = orthonormal_basis(rng.standard_normal((2, 16)), 16)
    a, b = au.lora_factors(w, basis, axis)
    delta = au.delta_from_lora(a, b, axis)
    np.testing.assert_allclose(delta.numpy(), (au.edit_tensor(w, basis, axis, "orthogonalized") - w).numpy(),
                               atol=1e-12)


def test_the_audit_reports_both_edits(lm_dir, vec, store):
    res = pa.steer_audit(lm_dir, vec, "numpy-torch", store=store, device="cpu")
    s = res.summary.set_index("edit")
    assert list(s.index) == ["original", "orthogonalized", "norm_preserving"]
    assert s.loc["orthogonalized", "max_residual"] < 1e-5 and s.loc["norm_preserving", "max_residual"] < 1e-5
    assert (s.loc[["orthogonalized", "norm_preserving"], "kl"] > 0).all()
    t = res.tensors
    assert set(t["edit"]) == {"orthogonalized", "norm_preserving"}
    assert {"kappa_before", "kappa_after", "stable_rank_after", "alpha_after"} <= set(t.columns)
    assert any(n.endswith("embed_tokens.weight") for n in t["tensor"])
    again = pa.steer_audit(lm_dir, vec, "numpy-torch", store=store, device="cpu")
    assert again.summary.equals(res.summary) and len(pa.stored_audits(store=store)) == 1


def test_the_peft_lora_adapter_reproduces_the_orthogonalised_model(lm_dir, vec, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from analysis.steering.pipeline_vectors import steer_orthogonalize

    adapter = pa.steer_lora(lm_dir, vec, tmp_path / "lora")
    orth = steer_orthogonalize(lm_dir, vec, tmp_path / "orth").path
    base = AutoModelForCausalLM.from_pretrained(lm_dir, torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter)
    edited = AutoModelForCausalLM.from_pretrained(orth, torch_dtype=torch.float32)
    ids = torch.randint(3, 500, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = peft_model(ids).logits, edited(ids).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-5 * scale
    merged = peft_model.merge_and_unload().state_dict()
    orth_w = open_source(orth)
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        ref = orth_w.tensor(name)
        assert float((merged[name] - ref).abs().max()) < 1e-6 * float(ref.abs().max())


@pytest.mark.parametrize("site,layer", [("resid_post", 1), ("resid_pre", 1), ("resid_pre", 0), ("attn_out", 0)])
def test_the_bias_weight_edit_reproduces_the_steering_hook(lm_dir, tmp_path, site, layer):
    from analysis.steering.search_export import edit_weights
    from analysis.steering.search_measure import setting_hooks

    v = np.random.default_rng(2).standard_normal(32).astype(np.float32)
    out = edit_weights(lm_dir, v, 0.7, site=site, layer=layer, out_dir=tmp_path / "edit")
    bridge = open_source(lm_dir).boot_bridge()
    edited = open_source(out).boot_bridge()
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with bridge.hooks(fwd_hooks=setting_hooks(bridge, v, 0.7, layer, site), reset_hooks_end=True):
            want = bridge(ids, return_type="logits")
        got = edited(ids, return_type="logits")
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_kappa_kept_drops_the_removed_directions(rng):
    w = torch.from_numpy(rng.standard_normal((12, 30)))  # d_model = 12 is the smaller side
    basis = orthonormal_basis(rng.standard_normal((2, 12)), 12)
    new = au.edit_tensor(w, basis, 0, "orthogonalized")
    row = au.tensor_audit("w", w, new, "orthogonalized", k=2)
    sv = np.linalg.svd(new.numpy(), compute_uv=False)
    assert sv[-2:].max() < 1e-12 * sv[0] and row["kappa_after"] > 1e10  # rank-deficient by 2
    assert row["kappa_kept_after"] == pytest.approx(sv[0] / sv[-3], rel=1e-8)
