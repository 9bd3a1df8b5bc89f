"""SAELens on-disk format compatibility, against real SAELens output.

``tests/data/saelens_tiny/`` was written by sae-lens 6.54.12 itself (``python
benchmarks/saelens_peer.py tiny tests/data/saelens_tiny`` inside ``.venv-saelens``): three tiny
SAEs (d_in 16 = 4 heads x 4, d_sae 32) and ``expected.json`` with SAELens's ``encode`` and
``forward`` outputs on fixed inputs. Our suite cannot import sae_lens (it pins other
TransformerLens/transformers versions), so the peer's numbers are the reference:

- ``standard``: ReLU SAE from ``save_inference_model``, decoder rows NOT unit norm,
  ``reshape_activations="hook_z"``;
- ``topk``: TopK SAE from ``save_inference_model`` (decoder norms folded by SAELens);
- ``topk_checkpoint``: the same TopK SAE from ``save_model`` (a trainer checkpoint):
  ``rescale_acts_by_decoder_norm=true`` with unfolded decoder norms;
- ``jumprelu``, ``gated`` (``reshape_activations="hook_z"``): trained as such, ``save_inference_model``;
- ``batchtopk``, ``matryoshka_batchtopk``: trained as such and saved by SAELens as "jumprelu" files
  with the running threshold (the training settings in ``metadata.training_architecture_details``).

The other direction (our ``save_saelens`` read by SAELens's ``SAE.load_from_disk``) needs the
SAELens venv: it is slow and skips when ``.venv-saelens`` is absent (build it with
``bash benchmarks/saelens_env.sh``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _support import SAELENS_PYTHON, saelens_load

from sae.config import SAEConfig
from sae.model import SAE
from sae.saelens_format import load_saelens, load_saelens_sparsity, saelens_l1_coefficient, save_saelens

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "saelens_tiny"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
ATOL = 1e-5  # float32 matmuls of width <= 32 in two torch builds' kernels


@pytest.mark.parametrize("name", sorted(EXPECTED["saes"]))
def test_load_reproduces_saelens_outputs(name):
    exp = EXPECTED["saes"][name]
    sae = load_saelens(FIXTURE / name)
    x = torch.tensor(EXPECTED["input"], dtype=torch.float32)
    assert exp["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                                   "matryoshka_batchtopk": "jumprelu", "gated": "gated"}[sae.cfg.architecture]
    assert sae.cfg.architecture == exp.get("trained_as", sae.cfg.architecture)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (16, 32)
    assert sae.cfg.hook_name == exp["hook_name"]
    assert sae.cfg.layer == int(exp["hook_name"].split(".")[1])
    if exp["k"] is not None:
        assert sae.cfg.k == exp["k"]
    with torch.no_grad():
        feats, recon = sae.encode(x), sae(x)
    np.testing.assert_allclose(feats.numpy(), np.array(exp["feature_acts"]), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(recon.numpy(), np.array(exp["sae_out"]), atol=ATOL, rtol=1e-5)
    assert (feats != 0).sum(-1).float().mean().item() == pytest.approx(exp["l0"])


@pytest.mark.parametrize("name", ["standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk", "gated"])
def test_load_keeps_inference_weights_exactly(name):
    """Files SAELens wrote with save_inference_model need no folding: the tensors load as stored
    (gated's b_gate is our b_enc)."""
    sae = load_saelens(FIXTURE / name)
    for pname, ref in EXPECTED["saes"][name]["checksums"].items():
        p = getattr(sae, {"b_gate": "b_enc"}.get(pname, pname)).detach().double()
        assert list(p.shape) == ref["shape"]
        assert p.sum().item() == pytest.approx(ref["sum"], rel=1e-6, abs=1e-6)
        assert p.abs().sum().item() == pytest.approx(ref["abs_sum"], rel=1e-6)


def _copy_with_cfg(name: str, dest: Path, edit) -> Path:
    """A copy of fixture ``name`` in ``dest`` whose cfg.json is ``edit(cfg)``."""
    import shutil

    shutil.copytree(FIXTURE / name, dest)
    cfg = json.loads((dest / "cfg.json").read_text())
    edit(cfg)
    (dest / "cfg.json").write_text(json.dumps(cfg))
    return dest


def test_load_reads_the_l1_coefficient_the_file_records(tmp_path):
    """SAELens 6 keeps a trained ReLU SAE's l1_coefficient in metadata.training_architecture_details
    (2.0 in the fixture), a training checkpoint or a pre-6 save at the top level."""
    assert load_saelens(FIXTURE / "standard").cfg.l1_coefficient == 2.0
    assert saelens_l1_coefficient(FIXTURE / "standard") == 2.0
    top = _copy_with_cfg("standard", tmp_path / "top", lambda c: (c["metadata"].pop("training_architecture_details"),
                                                                   c.update(l1_coefficient=0.25)))
    assert load_saelens(top).cfg.l1_coefficient == 0.25 and saelens_l1_coefficient(top) == 0.25
    bare = _copy_with_cfg("standard", tmp_path / "bare", lambda c: c["metadata"].pop("training_architecture_details"))
    assert saelens_l1_coefficient(bare) is None
    assert saelens_l1_coefficient(FIXTURE / "topk") is None
    ours = tmp_path / "ours"
    save_saelens(load_saelens(top), ours)  # our own export keeps it through metadata.lenslab_config
    assert load_saelens(ours).cfg.l1_coefficient == 0.25 and saelens_l1_coefficient(ours) == 0.25


@pytest.mark.parametrize("name", sorted(EXPECTED["saes"]))
def test_sparsity_file_reads(name):
    sp = load_saelens_sparsity(FIXTURE / name)
    assert sp is not None and sp.shape == (32,)
    assert torch.isfinite(sp).all() and (sp <= 0).all()  # log10 of a firing frequency in (0, 1]


ARCH_FIELDS = {"topk": dict(k=4), "batchtopk": dict(k=4), "matryoshka_batchtopk": dict(k=4, matryoshka_widths=(8, 32)),
               "jumprelu": dict(l0_coefficient=0.3), "gated": dict(l1_coefficient=0.5)}
ALL_ARCHITECTURES = ["relu", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk", "gated"]


def _our_sae(arch: str, seed: int) -> SAE:
    """A seeded SAE with non-trivial biases, thresholds, gates and (for relu) decoder rows off unit norm."""
    cfg = SAEConfig(d_in=16, d_sae=32, architecture=arch, **ARCH_FIELDS.get(arch, {}),
                    hook_name="blocks.2.attn.hook_z", layer=2, n_heads=4, d_head=4, seed=seed,
                    source_label="lenslab-test")
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(32, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(16, generator=g))
        sae.W_enc.add_(0.2 * torch.randn(16, 32, generator=g))
        if arch == "relu":
            sae.W_dec.mul_(torch.rand(32, 1, generator=g) + 0.5)
        if "threshold" in sae.weight_names:
            sae.threshold.copy_(0.3 * torch.rand(32, generator=g))
        if arch == "gated":
            sae.r_mag.copy_(0.3 * torch.randn(32, generator=g))
            sae.b_mag.copy_(0.1 * torch.randn(32, generator=g))
    return sae


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_our_save_round_trips(arch, tmp_path):
    """save_saelens then load_saelens: the same architecture, config and outputs."""
    sae = _our_sae(arch, seed=4)
    save_saelens(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "gated": "gated", "topk": "topk"}.get(arch, "jumprelu")
    back = load_saelens(tmp_path / "sae")
    assert back.cfg == sae.cfg and back.weight_names == sae.weight_names
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk", "jumprelu", "gated"])
def test_file_without_our_config_keeps_saelens_training_details(arch, tmp_path):
    """A file without metadata.lenslab_config (as SAELens writes it) loads as the same architecture
    with the settings SAELens records (k, widths, l0, l1)."""
    sae = _our_sae(arch, seed=5)
    d = _copy_dir_of(sae, tmp_path)
    cfg = json.loads((d / "cfg.json").read_text())
    del cfg["metadata"]["lenslab_config"]
    (d / "cfg.json").write_text(json.dumps(cfg))
    back = load_saelens(d)
    assert back.cfg.architecture == arch
    for name in ARCH_FIELDS[arch]:
        assert getattr(back.cfg, name) == getattr(sae.cfg, name), name


def _copy_dir_of(sae: SAE, tmp_path: Path) -> Path:
    save_saelens(sae, tmp_path / "sae")
    return tmp_path / "sae"


@pytest.mark.slow
@pytest.mark.skipif(not SAELENS_PYTHON.exists(), reason="no .venv-saelens: bash benchmarks/saelens_env.sh")
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_saelens_loads_our_save(arch, tmp_path):
    """SAELens's SAE.load_from_disk reads what save_saelens writes and computes what we compute."""
    sae = _our_sae(arch, seed=3)
    save_saelens(sae, tmp_path / "sae", sparsity=torch.linspace(-4, -1, 32))
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(5))
    report, theirs = saelens_load(tmp_path / "sae", x.numpy(), tmp_path)
    assert report["architecture"] == {"relu": "standard", "gated": "gated", "topk": "topk"}.get(arch, "jumprelu")
    assert report["hook_name"] == "blocks.2.attn.hook_z"
    for pname, ref in report["checksums"].items():
        p = getattr(sae, {"b_gate": "b_enc"}.get(pname, pname)).detach().double()
        assert p.sum().item() == pytest.approx(ref["sum"], rel=1e-6, abs=1e-6), pname
    with torch.no_grad():
        np.testing.assert_allclose(theirs["feature_acts"], sae.encode(x).numpy(), atol=ATOL, rtol=1e-5)
        np.testing.assert_allclose(theirs["sae_out"], sae(x).numpy(), atol=ATOL, rtol=1e-5)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "slow or not slow", "-q"]))
